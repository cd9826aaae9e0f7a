"""Pick and build the engine named by `engine.name` (auto: Megatron when CUDA + Megatron-Core + TE import)."""

import importlib.util
from typing import TYPE_CHECKING

from llmtrain.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only where a GPU must be asked (preflight and dry runs stay light)
    from llmtrain.dist import DistInfo
    from llmtrain.engines.base import Engine

ENGINES = ["auto", "torch", "megatron"]


def megatron_available() -> bool:
    # transformer_engine first: where it is missing (CPU machines) megatron is not imported by find_spec
    if not all(importlib.util.find_spec(m) is not None for m in ("transformer_engine", "megatron.core")):
        return False
    import torch

    return torch.cuda.is_available()


def check_cuda_available(device: str) -> None:
    """train.device asking for CUDA on a machine without it: one line (preflight and the torch engine)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("train.device", device, "CUDA is not available on this machine", ["auto", "cpu"])


def resolve_engine_name(cfg) -> str:
    name = cfg.engine.name
    if name not in ENGINES:
        raise ConfigError("engine", name, "unknown engine", ENGINES)
    if name == "auto":
        return "megatron" if megatron_available() else "torch"
    return name


def build_engine(cfg, dist: "DistInfo") -> "Engine":
    name = resolve_engine_name(cfg)
    if name == "megatron":
        if not megatron_available():
            raise ConfigError(
                "engine",
                "megatron",
                "needs CUDA, megatron-core and transformer-engine; install the gpu extra "
                "(pip install -e .[gpu]) on a GPU machine, or use engine=torch",
            )
        from llmtrain.engines.megatron_engine import MegatronEngine

        return MegatronEngine(cfg, dist)
    from llmtrain.engines.torch_engine import TorchEngine

    return TorchEngine(cfg, dist)

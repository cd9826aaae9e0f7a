"""Helpers for the tests and scripts/bench.py: a resolved config from group names without Hydra, an engine
disposed of between builds, a result recorded. (The mock batches live in the package: dry_run=measure uses them.)"""

import gc
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def make_config(
    model: str = "tiny", precision: str = "bf16", parallel: str = "single", overrides: dict | None = None
) -> DictConfig:
    """The schema defaults + configs/<group>/<name>.yaml for model/precision/parallel + overrides."""
    from llmtrain.config.schema import Config

    cfg = OmegaConf.structured(Config)
    for group, name in (("model", model), ("precision", precision), ("parallel", parallel)):
        raw = OmegaConf.load(CONFIG_ROOT / group / f"{name}.yaml")
        # A variant (e.g. precision=variant/fp8_cs_all_layers) names its base in `defaults`, as Hydra reads it.
        for parent in [d for d in raw.pop("defaults", []) if d != "_self_"]:
            cfg[group] = OmegaConf.merge(cfg[group], OmegaConf.load(CONFIG_ROOT / group / f"{parent}.yaml"))
        cfg[group] = OmegaConf.merge(cfg[group], raw)
    cfg.engine.name = "megatron"
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return cfg


def dispose(engine) -> None:
    """Close an engine and give its GPU memory back, so the next one in this process starts clean (close()
    drops the engine's references to its models and optimizer, so this works while the caller still holds
    the engine object)."""
    engine.close()
    gc.collect()
    torch.cuda.empty_cache()


def record(name: str, data) -> None:
    """Print a result; also append it as one JSON line to the file $LLMTRAIN_TEST_RESULTS when set."""
    line = json.dumps({"name": name, **data} if isinstance(data, dict) else {"name": name, "data": data})
    out = os.environ.get("LLMTRAIN_TEST_RESULTS")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    print(f"\n[{name}] {line}")

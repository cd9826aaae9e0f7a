"""Helpers for the GPU tests and scripts/bench.py: a resolved config from group names, mock batches."""

import gc
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

CONFIG_ROOT = Path(__file__).resolve().parents[3] / "configs"


def make_config(
    model: str = "tiny", precision: str = "bf16", parallel: str = "single", overrides: dict | None = None
) -> DictConfig:
    """The schema defaults + configs/<group>/<name>.yaml for model/precision/parallel + overrides."""
    from llmtrain.config.schema import Config

    cfg = OmegaConf.structured(Config)
    for group, name in (("model", model), ("precision", precision), ("parallel", parallel)):
        cfg[group] = OmegaConf.merge(cfg[group], OmegaConf.load(CONFIG_ROOT / group / f"{name}.yaml"))
    cfg.engine.name = "megatron"
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return cfg


def mock_batches(n: int, mbs: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Mock data (random tokens): `n` micro-batches as the data layer yields them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
        out.append(
            {
                "tokens": t[:, :-1].contiguous(),
                "labels": t[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, seq),
            }
        )
    return out


def dispose(engine) -> None:
    """Close an engine and give its GPU memory back, so the next one in this process starts clean."""
    engine.close()
    del engine
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

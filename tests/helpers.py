"""Shared helpers for CLI-level tests: run `python -m llmtrain` in a subprocess with a very small model."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A ~70k-parameter model and tiny batches: each step takes milliseconds on 2 cores.
FAST = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=172",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.console=plain",
]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")  # deterministic and friendly to parallel test runs
    env.pop("WORLD_SIZE", None)
    env.pop("SLURM_JOB_ID", None)
    return env


def llmtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmtrain", *args]


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        llmtrain_cmd(*args), capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def save_tiny_hf_model(tmp_path, config_cls, model_cls, *, tied, name="hf", dtype=None, **config):
    """A tiny random HF causal LM (vocab 128, hidden 64, 2 layers, 4 heads / 2 KV groups), its norm weights
    made non-trivial so a mix-up of norms would show, saved sharded (several safetensors + an index).
    `config` adds or overrides config fields (e.g. rope_theta, head_dim). Returns (model, path)."""
    import torch

    torch.manual_seed(0)
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied)  # fmt: skip
    model = model_cls(config_cls(**{**fields, **config})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / name
    model.save_pretrained(str(path), max_shard_size="60KB")
    return model, path


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(tokens).logits.float()

#!/usr/bin/env python
"""Tiny model, nvfp4_fp4all, trained 30 steps on the built-in corpus (GBS 16), then the probe on the next
global batch of 16 sequences split into micro-batches of 2/4/8/16; 4 SR draws each. Also the old
estimator (backward-only ratio on the first micro-batch alone)."""

import statistics as st
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.megatron_helpers

from llmtrain.data import build_data
from llmtrain.dist import DistInfo
from llmtrain.engines.torch_engine import TorchEngine
from llmtrain.precision.monitor import probe_quantization_noise
from llmtrain.train.schedule import schedule_from_config
from tests.megatron_helpers import make_config

torch.set_num_threads(2)
cfg = make_config(
    "tiny",
    "nvfp4_fp4all",
    "single",
    {
        "train": {"global_batch_size": 16, "micro_batch_size": 16, "steps": 40, "device": "cpu"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
    },
)
eng = TorchEngine(cfg, DistInfo())
data = build_data(cfg, log=lambda *a: None)
lr_at = schedule_from_config(cfg.optim, cfg.train.steps)
t = time.time()
for step in range(30):
    eng.begin_step(step + 1)
    r = eng.train_step(data.train_batch(step), lr_at(step))
print(f"trained 30 steps, loss {r.loss:.3f}, {time.time() - t:.0f}s", flush=True)
gb = data.train_batch(30)[0]


def split(b):
    return [{k: v[i : i + b] for k, v in gb.items()} for i in range(0, 16, b)]


for b in (2, 4, 8, 16):
    new = [probe_quantization_noise(eng.model, split(b), eng._loss, step=30 + 100 * s) for s in range(4)]
    old = [probe_quantization_noise(eng.model, split(b)[:1], eng._loss, step=30 + 100 * s) for s in range(4)]

    def fmt(v):
        return f"{st.mean(v):.2f}+-{st.stdev(v):.2f}"

    print(
        f"mbs={b:2d} global: all {fmt([p.ratios['all'] for p in new])} backward {fmt([p.metrics['backward'] for p in new])} "
        f"sr {fmt([p.metrics['sr'] for p in new])} | first micro-batch only: backward {fmt([p.metrics['backward'] for p in old])}",
        flush=True,
    )
print(f"total {time.time() - t:.0f}s")

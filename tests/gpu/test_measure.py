"""dry_run=measure on one GPU: small layouts of a fake world measured against the estimate.

The exact parts of the estimate (parameter, gradient and optimizer bytes: arithmetic on the parameter count
over tp, pp and dp) must match the measured buffers to within Megatron's bucket padding; activations are
only recorded (the estimate's activation model is what docs/benchmarks.md's layout table checks).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.megatron_helpers import record

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
# Llama 3.2 1B shapes (tied embeddings, vocab 128256), 4 layers, seq 2048: a few GiB per rank.
SMALL = [
    "recipe=llama3_1b",
    "model.num_layers=4",
    "model.seq_length=2048",
    "train.global_batch_size=32",
    "train.micro_batch_size=2",
    "parallel.distributed_optimizer=true",
    "measure.steps=2",
]
PADDING = 0.02  # Megatron pads DDP buckets and distributed-optimizer shards; far below 2% at this size


def run_measure(tmp_path: Path, *overrides: str) -> tuple[dict, str]:
    out = tmp_path / "measure.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain", *SMALL, *overrides, "dry_run=measure", f"measure.json={out}",
         f"hydra.run.dir={tmp_path / 'run'}", "hydra.output_subdir=null"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text().splitlines()[-1]), proc.stdout


def assert_exact_parts_match(r: dict) -> None:
    est, m = r["estimate"], r["measured"]
    assert r["ok"] and r["optimizer_state_allocated"], r
    for key in ("weights", "grads", "optimizer"):
        assert abs(m[key] - est[key]) <= PADDING * est[key], (key, est[key], m[key])
    assert m["peak"] >= m["weights"] + m["grads"] + m["optimizer"]
    assert m["activations"] > 0


def test_tp2_dp2_rank0_matches_the_estimate(tmp_path):
    r, stdout = run_measure(
        tmp_path, "cluster.gpus_per_node=4", "parallel.tp=2", "parallel.sequence_parallel=true"
    )
    record("measure_tp2_dp2_bf16", {k: r.get(k) for k in ("estimate", "measured", "backend")})
    assert (r["tp"], r["dp"], r["rank"], r["stage"]) == (2, 2, 0, 0)
    assert "NOT REAL: losses and communication" in stdout and "measured dry run" in stdout
    assert_exact_parts_match(r)


def test_pp2_vpp2_last_stage_holds_the_output_layer(tmp_path):
    r, _ = run_measure(
        tmp_path, "cluster.gpus_per_node=4", "parallel.pp=2", "parallel.vpp=2", "measure.rank=-1"
    )
    record("measure_pp2_vpp2_last_bf16", {k: r.get(k) for k in ("estimate", "measured", "backend")})
    assert (r["rank"], r["stage"], r["pp"], r["dp"]) == (3, 1, 2, 2)
    assert r["estimate"]["logits"] > 0
    assert_exact_parts_match(r)


def test_lowp_param_gather_cuts_resident_memory(tmp_path):
    """FP8-CS (TE native on Hopper and later): with the low-precision all-gather the quantized layers keep
    no BF16 weight, so what stays resident between steps (weights + TE's low-precision copies) shrinks."""
    common = ("precision=fp8_cs", "cluster.gpus_per_node=2")
    on, _ = run_measure(tmp_path / "on", *common)
    off, _ = run_measure(tmp_path / "off", *common, "parallel.lowp_param_gather=false")
    record(
        "measure_lowp_param_gather_fp8_cs",
        {"on": on.get("measured"), "off": off.get("measured"), "estimate_on": on.get("estimate"),
         "estimate_off": off.get("estimate")},
    )  # fmt: skip
    assert on["lowp_param_gather"] is True and off["lowp_param_gather"] is False
    assert on["ok"] and off["ok"]
    resident = {
        n: r["measured"]["weights"] + r["measured"]["copies_and_other"] for n, r in (("on", on), ("off", off))
    }
    assert resident["on"] < resident["off"], resident

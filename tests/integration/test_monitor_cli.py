"""The sqrt(3) monitor and the BF16 evaluation through the CLI: what metrics.jsonl holds, that neither
changes training by a bit, and that the probe sees the same global batch under DP=2 as on one process."""

import math
import subprocess

import pytest

from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd, losses, read_metrics, run_cli_in_process

FP4 = [*FAST, "precision=nvfp4_fp4all", "precision.qaf.trigger=off"]


def test_probe_and_bf16_eval_are_logged_and_change_no_loss(tmp_path):
    steps = ["train.steps=6", "train.eval_interval=3", "train.eval_steps=2"]
    run_cli_in_process(
        *FP4, *steps, "precision.monitor.interval=1", f"hydra.run.dir={tmp_path / 'on'}", check=True
    )
    run_cli_in_process(*FP4, *steps, "precision.monitor.enabled=false", "train.eval_bf16=false",
            f"hydra.run.dir={tmp_path / 'off'}", check=True)  # fmt: skip
    # SR in every backward: any state the probe or the BF16 eval left behind would change the losses.
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    on, off = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    # A probe after every step but the last (it measures the batch of the next step).
    assert [r["step"] for r in on if "sqrt3/all" in r] == [1, 2, 3, 4, 5]
    for r in on[:5]:
        assert all(0 < r[f"sqrt3/{k}"] < math.inf for k in ("all", "backward", "sr", "grad_norm")), r
    evals = [r for r in on if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert math.isfinite(r["val_loss_bf16"]) and r["val_loss_bf16"] != r["val_loss"]
    assert [r["val_loss"] for r in evals] == [r["val_loss"] for r in off if "val_loss" in r]
    assert not any("val_loss_bf16" in r or "sqrt3/all" in r for r in off)


def test_bf16_runs_log_no_separate_bf16_eval(tmp_path):
    run_cli_in_process(
        *FAST, "train.steps=2", "train.eval_interval=2", f"hydra.run.dir={tmp_path}", check=True
    )
    last = read_metrics(tmp_path)[-1]
    assert "val_loss" in last and "val_loss_bf16" not in last


def test_eval_bf16_must_be_a_bool(tmp_path):
    proc = run_cli_in_process(*FP4, "train.eval_bf16=maybe", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.eval_bf16" in proc.stderr and "not a valid bool" in proc.stderr


@pytest.mark.slow
def test_probe_under_two_data_parallel_ranks_equals_one_process(tmp_path):
    """MXFP8 with round-to-nearest: the probe's quantized operands do not depend on how the global batch
    is split, so DP=2 (one micro-batch per rank, gradients averaged over ranks before the norm) must give
    the one-process numbers (two micro-batches); measured bit-identical, the 1/2 averaging being exact."""
    args = [*FAST, "train.steps=3", "precision=mxfp8", "precision.bf16_layers.last=0",
            "precision.monitor.enabled=true", "precision.monitor.interval=1"]  # fmt: skip
    run_cli_in_process(*args, f"hydra.run.dir={tmp_path / 'one'}", check=True)
    cmd = llmtrain_cmd(*args, f"hydra.run.dir={tmp_path / 'ddp'}")
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, ddp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    keys = [k for k in one[0] if k.startswith("sqrt3/") and k != "sqrt3/below_streak"]
    assert "sqrt3/all" in keys and "sqrt3/layers.0.mlp.down_proj" in keys
    for a, b in zip(one[:2], ddp[:2]):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-6), k

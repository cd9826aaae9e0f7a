"""Exact resume: SIGKILL at several points, SIGTERM, corrupt latest checkpoint — same losses, bit for bit."""

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd, losses, read_metrics, run_cli

STEPS = 10
ARGS = [*FAST, f"train.steps={STEPS}", "train.checkpoint_interval=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_cli(*ARGS, f"hydra.run.dir={run_dir}", check=True)
    return losses(run_dir)


def start(run_dir) -> subprocess.Popen:
    return subprocess.Popen(
        llmtrain_cmd(*ARGS, f"hydra.run.dir={run_dir}"),
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(proc: subprocess.Popen, run_dir, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"no step {n} within {timeout}s")


@pytest.mark.parametrize("kill_after", [1, 4, 7])
def test_sigkill_then_resume_gives_bitwise_identical_losses(tmp_path, reference, kill_after):
    proc = start(tmp_path)
    wait_for_steps(proc, tmp_path, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    assert losses(tmp_path) == reference  # exact float equality, every step
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, STEPS + 1))
    if kill_after >= 3:
        assert "resumed from" in resumed.stdout


def test_sigterm_checkpoints_and_exits_zero_then_resumes_exactly(tmp_path, reference):
    proc = start(tmp_path)
    wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    stopped_at = len(read_metrics(tmp_path))
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"  # checkpoint written at the stop, not just periodic ones
    run_cli(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    assert losses(tmp_path) == reference


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference):
    run_cli(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    model_file = tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated latest
    proc = run_cli(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    assert "checksum mismatch" in proc.stderr and f"step_{STEPS - 2:08d}" in proc.stdout
    assert losses(tmp_path) == reference


def test_stochastic_rounding_and_qaf_resume_exactly(tmp_path):
    """nvfp4_fp4all: SR in the backward, the sqrt(3) probe, and a QAF switch after the resume point.

    SR draws are seeded per (layer, step), and the QAF state is checkpointed, so a SIGKILL + resume
    repeats every loss bit for bit.
    """
    args = [*ARGS, "precision=nvfp4_fp4all", "precision.qaf.trigger=fraction", "precision.qaf.fraction=0.7",
            "precision.monitor.interval=2"]  # fmt: skip
    ref_dir = tmp_path / "ref"
    run_cli(*args, f"hydra.run.dir={ref_dir}", check=True)
    records = read_metrics(ref_dir)
    assert [r["step"] for r in records if r.get("qaf_switch")] == [7]
    proc = subprocess.Popen(llmtrain_cmd(*args, f"hydra.run.dir={tmp_path / 'run'}"), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_steps(proc, tmp_path / "run", 5)  # killed after step 5: resumes at 4, SR in steps 5-7
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", check=True)
    assert losses(tmp_path / "run") == losses(ref_dir)


def test_nan_steps_are_skipped_then_the_run_stops_cleanly(tmp_path):
    run_dir = tmp_path / "skip"
    proc = run_cli(
        *FAST, "train.steps=4", "train.inject_nan_steps=[2]", f"hydra.run.dir={run_dir}", check=True
    )
    records = read_metrics(run_dir)
    assert records[1].get("skipped") is True and "update skipped" in proc.stderr
    assert all(r["loss"] == r["loss"] for i, r in enumerate(records) if i != 1)  # finite elsewhere

    run_dir = tmp_path / "diverge"
    proc = run_cli(
        *FAST,
        "train.steps=6",
        "train.checkpoint_interval=1",
        "train.nan.max_skips=1",
        "train.inject_nan_steps=[3,4]",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 3
    assert "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000003"  # the skipped step 3 left the weights clean; step 4 was not saved
    for name, tensor in load_file(run_dir / "checkpoints" / latest / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def test_two_process_ddp_on_cpu_matches_one_process(tmp_path):
    single = tmp_path / "single"
    run_cli(*FAST, "train.steps=4", f"hydra.run.dir={single}", check=True)
    ddp = tmp_path / "ddp"
    env = cli_env()
    cmd = [*llmtrain_cmd(*FAST, "train.steps=4", f"hydra.run.dir={ddp}")]
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2" in proc.stdout
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    assert os.path.exists(ddp / "checkpoints" / "step_00000004" / "rng_rank00001.pt")

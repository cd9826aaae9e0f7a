"""Exact resume: SIGKILL at several points, SIGTERM, corrupt latest checkpoint — same losses, bit for bit."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.train import loop
from tests.faults import nan_at_steps
from tests.helpers import (
    FAST,
    REPO,
    cli_env,
    compose_config,
    llmtrain_cmd,
    losses,
    read_metrics,
    run_cli_in_process,
)

STEPS = 10
ARGS = [*FAST, f"train.steps={STEPS}", "train.checkpoint_interval=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_cli_in_process(*ARGS, f"hydra.run.dir={run_dir}", check=True)
    return losses(run_dir)


def start(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        llmtrain_cmd(*ARGS, *extra, f"hydra.run.dir={run_dir}"),
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as in a terminal even when pytest itself runs as a background job (which inherits SIGINT
        # ignored, and llmtrain keeps an ignored SIGINT ignored, as nohup users expect)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_after, extra", [(1, ()), (4, ()), (7, ()), (5, ("train.checkpoint_async=true",))]
)
def test_sigkill_then_resume_gives_bitwise_identical_losses(tmp_path, reference, kill_after, extra):
    proc = start(tmp_path, *extra)
    wait_for_steps(proc, tmp_path, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli_in_process(*ARGS, *extra, f"hydra.run.dir={tmp_path}", check=True)
    assert losses(tmp_path) == reference  # exact float equality, every step
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, STEPS + 1))
    if kill_after >= 3:
        assert "resumed from" in resumed.stdout


@pytest.mark.slow
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
    run_cli_in_process(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    assert losses(tmp_path) == reference


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference):
    run_cli_in_process(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    model_file = tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated latest
    proc = run_cli_in_process(*ARGS, f"hydra.run.dir={tmp_path}", check=True)
    assert "checksum mismatch" in proc.stderr and f"step_{STEPS - 2:08d}" in proc.stdout
    assert losses(tmp_path) == reference


@pytest.mark.slow
def test_stochastic_rounding_and_qaf_resume_exactly(tmp_path):
    """nvfp4_fp4all: SR in the backward, the sqrt(3) probe, and a QAF switch after the resume point.

    SR draws are seeded per (layer, step), and the QAF state is checkpointed, so a SIGKILL + resume
    repeats every loss bit for bit.
    """
    args = [*ARGS, "precision=nvfp4_fp4all", "precision.qaf.trigger=fraction", "precision.qaf.fraction=0.7",
            "precision.monitor.interval=2"]  # fmt: skip
    ref_dir = tmp_path / "ref"
    run_cli_in_process(*args, f"hydra.run.dir={ref_dir}", check=True)
    records = read_metrics(ref_dir)
    assert [r["step"] for r in records if r.get("qaf_switch")] == [7]
    proc = subprocess.Popen(llmtrain_cmd(*args, f"hydra.run.dir={tmp_path / 'run'}"), env=cli_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_steps(proc, tmp_path / "run", 5)  # killed after step 5: resumes at 4, SR in steps 5-7
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_cli_in_process(*args, f"hydra.run.dir={tmp_path / 'run'}", check=True)
    assert losses(tmp_path / "run") == losses(ref_dir)


def test_nan_steps_are_skipped_then_the_run_stops_cleanly(tmp_path, monkeypatch):
    run_dir = tmp_path / "skip"
    monkeypatch.setattr(loop, "build_data", nan_at_steps([2]))
    proc = run_cli_in_process(*FAST, "train.steps=4", f"hydra.run.dir={run_dir}", check=True)
    records = read_metrics(run_dir)
    assert records[1].get("skipped") is True and "update skipped" in proc.stderr
    assert all(r["loss"] == r["loss"] for i, r in enumerate(records) if i != 1)  # finite elsewhere

    run_dir = tmp_path / "diverge"
    monkeypatch.undo()  # the clean build_data again, then poison steps 3 and 4 only
    monkeypatch.setattr(loop, "build_data", nan_at_steps([3, 4]))
    proc = run_cli_in_process(
        *FAST, "train.steps=6", "train.checkpoint_interval=1", "train.nan.max_skips=1",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 3
    assert "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000003"  # the skipped step 3 left the weights clean; step 4 was not saved
    for name, tensor in load_file(run_dir / "checkpoints" / latest / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name


@pytest.mark.slow
def test_two_process_ddp_on_cpu_matches_one_process(tmp_path):
    single = tmp_path / "single"
    run_cli_in_process(*FAST, "train.steps=4", f"hydra.run.dir={single}", check=True)
    ddp = tmp_path / "ddp"
    env = cli_env()
    cmd = [*llmtrain_cmd(*FAST, "train.steps=4", f"hydra.run.dir={ddp}")]
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2" in proc.stdout
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
    assert os.path.exists(ddp / "checkpoints" / "step_00000004" / "rng_rank00001.pt")


# ---- resume at the edges (issue 16) --------------------------------------------------------------------
def compose_cfg(*overrides):
    """The config `python -m llmtrain` would build, composed in-process (no subprocess start-up cost)."""
    return compose_config(*FAST, "engine=torch", "train.device=cpu", *overrides)


def tree_digest(root):
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_changed_global_batch_size_continues_at_the_consumed_sample(tmp_path, capsys):
    """Data position = samples consumed: a resume with another global batch size skips and repeats nothing."""
    from llmtrain.data import build_data
    from llmtrain.train.loop import train

    train(compose_cfg("train.steps=3", "train.checkpoint_interval=3"), tmp_path)
    cfg = compose_cfg("train.steps=5", "train.global_batch_size=8", "train.checkpoint_interval=1")
    capsys.readouterr()
    train(cfg, tmp_path)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000003'} (step 3, " in capsys.readouterr().out
    tokens = [r["tokens"] for r in read_metrics(tmp_path)]
    assert tokens == [4 * 64, 8 * 64, 12 * 64, 20 * 64, 28 * 64]  # not step x new batch (24, 40, ...)
    state = torch.load(tmp_path / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=True)
    assert state["consumed_samples"] == 20
    assert state["data_fingerprint"] == build_data(cfg).fingerprint
    # step 4 trained samples 12..19 (the data right after step 3's), as the loop asked for them
    data = build_data(cfg)
    expected = torch.cat([mb["tokens"] for mb in data.batch_at(12)])
    assert torch.equal(expected, torch.stack([data.train[i]["tokens"] for i in range(12, 20)]).long())


def test_every_checkpoint_corrupt_refuses_and_touches_nothing(tmp_path):
    run_cli_in_process(
        *ARGS[:-3], "train.steps=4", "train.checkpoint_interval=2", f"hydra.run.dir={tmp_path}", check=True
    )
    for model in (tmp_path / "checkpoints").glob("step_*/model.safetensors"):
        model.write_bytes(model.read_bytes()[:500])
    before = tree_digest(tmp_path)
    proc = run_cli_in_process(*ARGS[:-3], "train.steps=6", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "all 2 checkpoints fail verification" in last and "train.resume=never" in last
    assert tree_digest(tmp_path) == before


def test_refused_resume_and_resume_never_leave_the_old_run_byte_for_byte(tmp_path):
    run_dir = tmp_path / "run"
    run_cli_in_process(*ARGS[:-3], "train.steps=2", f"hydra.run.dir={run_dir}", check=True)
    before = tree_digest(run_dir)
    proc = run_cli_in_process(*ARGS[:-3], "train.steps=4", "model.num_layers=3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.num_layers=3 but the checkpoint" in proc.stderr and "set model.num_layers=2" in proc.stderr
    assert tree_digest(run_dir) == before  # config.yaml and .hydra/ still say num_layers 2
    run_cli_in_process(
        *ARGS[:-3], "train.steps=2", "train.resume=never", f"hydra.run.dir={run_dir}", check=True
    )
    assert tree_digest(run_dir) == before
    assert (tmp_path / "run-restart1" / "checkpoints" / "latest").is_file()


def test_resume_refuses_what_it_cannot_load_before_loading(tmp_path):
    from llmtrain.errors import CheckpointError, UserError
    from llmtrain.train.loop import train
    from llmtrain.train.run_dir import plan_run

    train_dir = tmp_path / "run"
    train_dir.mkdir()
    train(compose_cfg("train.steps=1"), train_dir)
    step = train_dir / "checkpoints" / "step_00000001"
    for key, value, theirs in [("model.hidden_size", 128, 64), ("model.vocab_size", 8192, 4096),
                               ("model.tie_embeddings", True, False)]:  # fmt: skip
        cfg = compose_cfg(f"{key}={value}", f"train.resume={step}")
        with pytest.raises(
            CheckpointError, match=rf"{key}={value} but the checkpoint .* has {theirs}; set {key}={theirs}"
        ):
            plan_run(cfg, tmp_path / "new", "torch")
    with pytest.raises(CheckpointError, match=r"written by the torch engine .* resume with engine=torch"):
        plan_run(compose_cfg(f"train.resume={step}"), tmp_path / "new", "megatron")
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (weights_only / name).write_bytes((step / name).read_bytes())
    from llmtrain.checkpoint_format import write_manifest

    write_manifest(weights_only, 1)
    with pytest.raises(CheckpointError, match=rf"weights-only checkpoint .* train.init_from={weights_only}"):
        plan_run(compose_cfg(f"train.resume={weights_only}"), tmp_path / "new", "torch")
    # someone else's config.yaml in the run dir is not replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine: 1\n")
    with pytest.raises(UserError, match=r"config.yaml exists and is not an llmtrain run's"):
        plan_run(compose_cfg(), foreign, "torch")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"is a file, not a directory"):
        plan_run(compose_cfg(), tmp_path / "file" / "run", "torch")


def test_resume_never_is_one_decision_and_a_requeued_slurm_job_continues_its_run(tmp_path, monkeypatch):
    """Ranks decide alone but alike: a dir only counts as taken once it holds training state; a SLURM job
    marks its dir, so a requeue (same job id) continues there instead of starting restartN+1."""
    from llmtrain.train.loop import train
    from llmtrain.train.run_dir import claim, plan_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(compose_cfg("train.steps=1"), run_dir)
    cfg = compose_cfg("train.resume=never", "train.steps=2")
    first = plan_run(cfg, run_dir, "torch")
    assert first.run_dir.name == "run-restart1" and first.resume_dir is None
    first.run_dir.mkdir()  # rank 0 got there first (Hydra made the dir, config.yaml written)
    (first.run_dir / ".hydra").mkdir()
    assert plan_run(cfg, run_dir, "torch").run_dir == first.run_dir  # a later rank agrees
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    claim(first.run_dir)
    train(cfg, first.run_dir, resume_dir=None)
    again = plan_run(compose_cfg("train.resume=never", "train.steps=3"), run_dir, "torch")
    assert again.run_dir == first.run_dir and again.resume_dir.name == "step_00000002"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: a new run beside both
    assert plan_run(cfg, run_dir, "torch").run_dir.name == "run-restart2"


@pytest.mark.slow
def test_resume_never_with_two_ranks_and_an_existing_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_cli_in_process(*FAST, "train.steps=2", f"hydra.run.dir={run_dir}", check=True)
    cmd = llmtrain_cmd(*FAST, "train.steps=2", "train.resume=never", f"hydra.run.dir={run_dir}")
    cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run-restart1" / "checkpoints" / "step_00000002" / "rng_rank00001.pt").is_file()
    assert not (tmp_path / "run-restart2").exists()


# ---- signals -------------------------------------------------------------------------------------------
def handler_installed(pid: int, sig: int) -> bool:
    """Linux: the process catches `sig` (SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_like_sigterm(tmp_path):
    proc = start(tmp_path)
    wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "SIGINT received: stopping after this step with a checkpoint" in err and "stopped by SIGINT" in out
    stopped_at = len(read_metrics(tmp_path))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"


@pytest.mark.slow
def test_sigterm_during_start_up_is_acknowledged_not_a_silent_143(tmp_path):
    proc = start(tmp_path)
    deadline = time.time() + 60
    while not handler_installed(proc.pid, signal.SIGTERM):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    assert not (tmp_path / "metrics.jsonl").exists()  # still starting: nothing trained yet
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "stopped by SIGTERM before step 1" in out

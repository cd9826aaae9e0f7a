"""train.checkpoint_async with the Megatron engine (Megatron-Core's async dist-checkpoint request, written
in llmtrain's background thread). Run on the GPU host: `pytest -m gpu tests/gpu/test_megatron_async_checkpoint.py -s`.
"""

import os
import signal
import subprocess
import time

import pytest

from llmtrain.dist import DistInfo
from llmtrain.engines.megatron_engine.batches import mock_batches
from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd, losses, read_metrics, run_cli
from tests.megatron_helpers import dispose, make_config, record

pytestmark = pytest.mark.gpu

# Deterministic TE attention kernels (inherited by the CLI runs below), as in test_megatron_engine.py.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")


def engine_for(overrides=None):
    from llmtrain.engines.megatron_engine import MegatronEngine

    return MegatronEngine(make_config("tiny", "bf16", "single", overrides), DistInfo())


def test_async_snapshot_is_the_state_at_the_call_not_after_the_next_step(tmp_path):
    """start_save, then a training step, then the background write: loading it repeats the steps after
    the snapshot exactly as loading a synchronous save of the same state does."""
    batches = [mock_batches(2, 2, 256, 4096, seed=s) for s in range(4)]
    engine = engine_for()
    for b in batches[:2]:
        engine.train_step(b, lr=1e-3)
    engine.save(tmp_path / "sync")
    pending = engine.start_save(tmp_path / "async")
    straight = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]  # changes weights before the write
    pending.write()
    pending.finalize()
    dispose(engine)
    resumed = {}
    for kind in ("sync", "async"):
        engine = engine_for({"train": {"seed": 99}})  # different init, then load
        engine.load(tmp_path / kind)
        resumed[kind] = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]
        dispose(engine)
    record("megatron_async_snapshot", {"uninterrupted": straight, **resumed})
    assert (tmp_path / "async" / "megatron" / "metadata.json").is_file()
    assert resumed["async"] == resumed["sync"]  # same state, same deterministic kernels: bit for bit
    assert resumed["async"] == pytest.approx(straight, rel=1e-6, abs=1e-6)  # as test_checkpoint_exact_resume


ARGS = [*FAST, "engine=megatron", "train.steps=6", "train.checkpoint_interval=2", "train.keep_last=0"]


def test_async_run_checkpoints_verify_and_resume_like_the_sync_run(tmp_path):
    from llmtrain.checkpoint_format import verify

    run_cli(*ARGS, f"hydra.run.dir={tmp_path / 'sync'}", check=True)
    run_cli(*ARGS, "train.checkpoint_async=true", f"hydra.run.dir={tmp_path / 'async'}", check=True)
    records = read_metrics(tmp_path / "async")
    record("megatron_async_run", {"checkpoint_s": [r.get("checkpoint_s") for r in records]})
    assert losses(tmp_path / "async") == pytest.approx(losses(tmp_path / "sync"), rel=1e-6, abs=1e-6)
    root = tmp_path / "async" / "checkpoints"
    for step in (2, 4, 6):
        verify(root / f"step_{step:08d}")
    assert (root / "latest").read_text().strip() == "step_00000006" and not list(root.glob(".tmp_*"))
    # resume from the async step-4 checkpoint into a new run dir: steps 5-6 as the sync run's
    run_cli(
        *ARGS, f"train.resume={root / 'step_00000004'}", f"hydra.run.dir={tmp_path / 'resumed'}", check=True
    )
    assert losses(tmp_path / "resumed")[-2:] == pytest.approx(
        losses(tmp_path / "sync")[-2:], rel=1e-6, abs=1e-6
    )


def test_sigterm_with_an_async_save_in_flight_exits_zero_with_verified_checkpoints(tmp_path):
    """The SIGTERM of a preemption reaches every process of the group: the background write (and the
    worker processes Megatron forks for it) must survive it, and the stop waits for it."""
    from llmtrain.checkpoint_format import verify
    from llmtrain.train.checkpoint import CheckpointManager

    args = [*ARGS[:-3], "train.steps=40", "train.checkpoint_interval=1", "train.checkpoint_async=true"]
    proc = subprocess.Popen(llmtrain_cmd(*args, f"hydra.run.dir={tmp_path}"), env=cli_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and not (
        (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 4
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as SLURM and `timeout` do
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    root = tmp_path / "checkpoints"
    stopped = len(read_metrics(tmp_path))
    assert (root / "latest").read_text().strip() == f"step_{stopped:08d}"
    for d in CheckpointManager(root, keep_last=0, is_main=True).step_dirs():
        verify(d)
    assert not list(root.glob(".tmp_*"))

"""train.checkpoint_async with the torch engine: the same checkpoint as a sync save, exact resume, background
failures as one line, and a stop (SIGTERM) or an error while a write is in flight."""

import errno
import os
import signal
import threading

import pytest
import torch

from llmtrain.checkpoint_format import verify
from llmtrain.dist import DistInfo
from llmtrain.engines.torch_engine import TorchEngine
from llmtrain.errors import CheckpointError, TrainingError
from llmtrain.train import loop
from llmtrain.train.checkpoint import CheckpointManager
from llmtrain.train.loop import train as train_in
from tests.faults import nan_at_steps
from tests.helpers import losses, read_metrics
from tests.integration.test_resume import compose_cfg, tree_digest

ASYNC = "train.checkpoint_async=true"


def train(cfg, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    return train_in(cfg, run_dir)


def test_async_save_writes_the_same_bytes_as_a_sync_save_from_its_snapshot(tmp_path, monkeypatch):
    """The background write must hold the state at the save call, not what the next step made of it."""
    from llmtrain.data import build_data

    cfg = compose_cfg("train.steps=4")
    engine = TorchEngine(cfg, DistInfo())
    data = build_data(cfg)
    for i in range(2):
        engine.train_step(data.batch_at(4 * i), 1e-3)
    gate = threading.Event()
    write = TorchEngine._write
    monkeypatch.setattr(TorchEngine, "_write", staticmethod(lambda *a: (gate.wait(30), write(*a))))
    args = ({"step": 2}, {"rng": torch.arange(3)}, 0, "model: {}\n")
    background = CheckpointManager(tmp_path / "async", keep_last=0, is_main=True)
    background.save_async(2, engine, *args)  # its write waits for the gate: the next step runs first
    engine.train_step(data.batch_at(8), 1e-3)  # mutates weights and optimizer state in place
    gate.set()
    background.wait()
    # reference: a sync save of the same state (reload the step-2 state: train again from scratch)
    engine2 = TorchEngine(cfg, DistInfo())
    for i in range(2):
        engine2.train_step(data.batch_at(4 * i), 1e-3)
    sync = CheckpointManager(tmp_path / "sync", keep_last=0, is_main=True)
    sync.save(2, engine2, *args)
    a, s = tree_digest(tmp_path / "async"), tree_digest(tmp_path / "sync")
    assert a == s  # byte for byte, manifest included
    assert set(a) >= {"step_00000002/model.safetensors", "step_00000002/optimizer.pt", "latest"}


def test_async_run_writes_the_sync_runs_checkpoints(tmp_path):
    reference = tmp_path / "sync"
    train(compose_cfg("train.steps=8", "train.checkpoint_interval=2", "train.keep_last=0"), reference)
    run = tmp_path / "async"
    train(compose_cfg("train.steps=8", "train.checkpoint_interval=2", "train.keep_last=0", ASYNC), run)
    records = read_metrics(run)
    assert [r["step"] for r in records if "checkpoint_s" in r] == [2, 4, 6, 8]
    assert all(r["checkpoint_wait_s"] >= 0 for r in records if "checkpoint_s" in r)
    assert losses(run) == losses(reference)
    for step in (2, 4, 6, 8):  # byte for byte, but for the config (checkpoint_async) and so the manifest
        name = f"step_{step:08d}"
        a, s = tree_digest(run / "checkpoints" / name), tree_digest(reference / "checkpoints" / name)
        assert set(a) == set(s)
        for key in set(a) - {"config.yaml", "manifest.json"}:
            assert a[key] == s[key], (name, key)
        verify(run / "checkpoints" / name)


def slow_background_write(monkeypatch, during):
    """The first background model write calls `during()` and then waits a little before writing."""
    write, calls = TorchEngine._write, []

    def slow(*a):
        if threading.current_thread() is not threading.main_thread() and not calls:
            calls.append(1)
            during()
            threading.Event().wait(0.5)
        write(*a)

    monkeypatch.setattr(TorchEngine, "_write", staticmethod(slow))
    return calls


def test_sigterm_while_an_async_write_is_in_flight_ends_with_complete_checkpoints(tmp_path, monkeypatch):
    calls = slow_background_write(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
    cfg = compose_cfg("train.steps=8", "train.checkpoint_interval=2", ASYNC)
    summary = train(cfg, tmp_path)
    assert calls and summary.stopped_by == "SIGTERM"
    root = tmp_path / "checkpoints"
    stopped = summary.steps_done
    assert summary.checkpoint == root / f"step_{stopped:08d}"
    assert (root / "latest").read_text().strip() == f"step_{stopped:08d}"
    for d in CheckpointManager(root, keep_last=0, is_main=True).step_dirs():
        verify(d)  # the in-flight one (step 2) and the stop's own one are both complete
    assert (root / "step_00000002").is_dir() and not list(root.glob(".tmp_*"))
    reference = tmp_path / "ref"
    train(compose_cfg("train.steps=8", "train.checkpoint_interval=2"), reference)
    monkeypatch.undo()
    train(cfg, tmp_path)
    assert losses(tmp_path) == losses(reference)


def test_an_error_while_an_async_write_is_in_flight_still_completes_it(tmp_path, monkeypatch):
    slow_background_write(monkeypatch, lambda: None)
    monkeypatch.setattr(loop, "build_data", nan_at_steps({3}))
    cfg = compose_cfg("train.steps=6", "train.checkpoint_interval=2", "train.nan.max_skips=0", ASYNC)
    with pytest.raises(TrainingError, match="training diverged"):
        train(cfg, tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    verify(root / "step_00000002")
    assert not list(root.glob(".tmp_*"))


@pytest.mark.parametrize("background", [True, False])
def test_full_disk_in_the_background_is_the_sync_error_at_the_next_step(tmp_path, monkeypatch, background):
    real, calls = TorchEngine._write, []

    def full_after_first(*a):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*a)

    monkeypatch.setattr(TorchEngine, "_write", staticmethod(full_after_first))
    overrides = ["train.steps=6", "train.checkpoint_interval=2", f"train.checkpoint_async={background}"]
    with pytest.raises(CheckpointError) as info:
        train(compose_cfg(*overrides), tmp_path)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint step 4 to {tmp_path / 'checkpoints'}: no space left")
    assert message.endswith("step_00000002 is intact; free space and rerun the same command")
    assert "\n" not in message
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000004").exists() and not list(root.glob(".tmp_*"))
    verify(root / "step_00000002")
    # sync: raised at step 4's save; async: at the next step boundary (step 5), after logging it
    assert read_metrics(tmp_path)[-1]["step"] == (5 if background else 4)


@pytest.mark.slow
def test_two_process_ddp_async_saves_every_step_like_sync(tmp_path):
    """Two gloo ranks: every poll and finalize is a collective both ranks reach; the checkpoints match."""
    import subprocess

    from tests.helpers import FAST, REPO, cli_env, llmtrain_cmd

    def run(name, *extra):
        cmd = llmtrain_cmd(*FAST, "train.steps=5", "train.checkpoint_interval=1", "train.keep_last=0", *extra,
                           f"hydra.run.dir={tmp_path / name}")  # fmt: skip
        cmd = [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        proc = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("sync")
    run("async", ASYNC)
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    for step in range(1, 6):
        name = f"step_{step:08d}"
        a = tree_digest(tmp_path / "async" / "checkpoints" / name)
        s = tree_digest(tmp_path / "sync" / "checkpoints" / name)
        assert {k: v for k, v in a.items() if k not in ("config.yaml", "manifest.json")} == {
            k: v for k, v in s.items() if k not in ("config.yaml", "manifest.json")
        }
        assert "rng_rank00001.pt" in a
        verify(tmp_path / "async" / "checkpoints" / name)

"""Async checkpoint saving at the CheckpointManager level: same bytes as a sync save, a consistent snapshot,
background failures as one line, retention that never outruns the write in flight."""

import errno
import threading
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint_format import verify
from llmtrain.engines.base import PendingWrite
from llmtrain.errors import CheckpointError
from llmtrain.train.checkpoint import CheckpointManager


class GatedEngine:
    """Snapshots a value at start_save; the background write waits for `gate` (the test decides when)."""

    def __init__(self, value: float, gate: threading.Event | None = None, error: Exception | None = None):
        self.value, self.gate, self.error = value, gate, error

    def save(self, directory: Path) -> None:
        torch.save({"w": torch.full((4,), self.value)}, directory / "model.pt")

    def start_save(self, directory: Path) -> PendingWrite:
        snapshot = torch.full((4,), self.value)

        def write():
            if self.gate is not None:
                assert self.gate.wait(30)
            if self.error is not None:
                raise self.error
            torch.save({"w": snapshot}, directory / "model.pt")

        return PendingWrite(write=write)


def save_async(mgr, step, engine):
    return mgr.save_async(step, engine, {"step": step}, {"rng": 1}, 0, "model: {}\n")


def test_retention_keeps_the_last_checkpoint_while_a_newer_one_is_written(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, is_main=True)
    mgr.save(2, GatedEngine(2.0), {"step": 2}, {"rng": 1}, 0, "model: {}\n")
    gate = threading.Event()
    save_async(mgr, 4, GatedEngine(4.0, gate))
    assert mgr.poll() is None  # still writing
    assert [p.name for p in mgr.step_dirs()] == ["step_00000002"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    gate.set()
    assert mgr.wait() >= 0 and mgr.last_saved == tmp_path / "step_00000004"
    assert [p.name for p in mgr.step_dirs()] == ["step_00000004"]  # pruned only after `latest` moved
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    verify(tmp_path / "step_00000004")
    assert torch.load(tmp_path / "step_00000004" / "model.pt")["w"][0] == 4.0
    assert not list(tmp_path.glob(".tmp_*"))


def test_a_new_save_waits_for_the_one_in_flight(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=0, is_main=True)
    gate = threading.Event()
    save_async(mgr, 2, GatedEngine(2.0, gate))
    threading.Timer(0.3, gate.set).start()
    waited = save_async(mgr, 4, GatedEngine(4.0))
    assert waited >= 0.2  # the second save waited for the first (timer 0.3 s, generous margin)
    mgr.wait()
    assert [p.name for p in mgr.step_dirs()] == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize(
    "exc, message",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            r"no space left .*; step_00000002 is intact; free",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), r"PermissionError: .*; step_00000002 is intact"),
    ],
)
def test_a_failed_background_write_is_the_sync_error_line_and_keeps_latest(tmp_path, exc, message):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    mgr.save(2, GatedEngine(2.0), {"step": 2}, {"rng": 1}, 0, "model: {}\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_00000002").iterdir()}
    gate = threading.Event()
    save_async(mgr, 4, GatedEngine(4.0, gate, error=exc))  # fails in the background, not here
    assert mgr.poll() is None
    gate.set()
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint step 4 to .*: {message}") as info:
        mgr.wait()
    assert "\n" not in str(info.value)
    # the same failure in a synchronous save gives the same line
    sync = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    with pytest.raises(CheckpointError) as sync_info:
        sync.save(4, FailingNow(exc), {"step": 4}, {"rng": 1}, 0, "model: {}\n")
    assert str(sync_info.value) == str(info.value)
    assert not list(tmp_path.glob(".tmp_*")) and not (tmp_path / "step_00000004").exists()
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_00000002").iterdir()} == before
    assert not mgr.in_flight


class FailingNow:
    def __init__(self, exc):
        self.exc = exc

    def save(self, directory):
        raise self.exc


def test_abandon_lets_the_write_end_and_removes_the_temp_dir(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    mgr.save(2, GatedEngine(2.0), {"step": 2}, {"rng": 1}, 0, "model: {}\n")
    gate = threading.Event()
    save_async(mgr, 4, GatedEngine(4.0, gate))
    threading.Timer(0.1, gate.set).start()
    mgr.abandon()
    assert not list(tmp_path.glob(".tmp_*")) and not mgr.in_flight
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint_format import resolve_checkpoint, verify
from llmtrain.errors import CheckpointError
from llmtrain.train.checkpoint import CheckpointManager


class FakeEngine:
    def __init__(self, value: float):
        self.value = value

    def save(self, directory: Path) -> None:
        torch.save({"w": torch.full((4,), self.value)}, directory / "model.pt")


def save(mgr: CheckpointManager, step: int) -> Path:
    return mgr.save(step, FakeEngine(float(step)), {"step": step}, {"rng": 1}, 0, "model: {}\n")


def test_save_writes_manifest_pointer_and_prunes(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    for step in (2, 4, 6):
        save(mgr, step)
    assert [p.name for p in mgr.step_dirs()] == ["step_00000004", "step_00000006"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    manifest = json.loads((tmp_path / "step_00000006" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "rng_rank00000.pt", "trainer.pt", "config.yaml"}
    assert not list(tmp_path.glob(".tmp_*"))


def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, is_main=True)
    save(mgr, 2)
    last = save(mgr, 4)
    blob = (last / "model.pt").read_bytes()
    (last / "model.pt").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert mgr.latest_valid() == tmp_path / "step_00000002"


def test_missing_manifest_is_not_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, is_main=True)
    step_dir = save(mgr, 2)
    (step_dir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        verify(step_dir)
    with pytest.warns(UserWarning):
        assert mgr.latest_valid() is None


def test_leftover_temp_dir_from_a_crash_is_ignored_and_replaced(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, is_main=True)
    save(mgr, 2)
    junk = tmp_path / ".tmp_step_00000004"
    junk.mkdir()
    (junk / "model.pt").write_bytes(b"half")
    assert mgr.latest_valid() == tmp_path / "step_00000002"
    save(mgr, 4)
    assert mgr.latest_valid() == tmp_path / "step_00000004"


def test_resolve_accepts_run_dir_checkpoints_dir_and_step_dir(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep_last=3, is_main=True)
    step_dir = save(mgr, 2)
    for p in (tmp_path, tmp_path / "checkpoints", step_dir):
        assert resolve_checkpoint(p) == step_dir
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


class FullDiskEngine:
    """Writes part of its file, then fails the way a full disk does."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def save(self, directory: Path) -> None:
        (directory / "model.pt").write_bytes(b"x" * 1000)
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054"),
    ],
)
def test_full_disk_leaves_previous_checkpoint_and_no_temp_dir(tmp_path, exc):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    good = save(mgr, 2)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(
        CheckpointError,
        match=r"cannot write checkpoint step 4 to .*: no space left .*step_00000002 is intact; free space and rerun",
    ):
        mgr.save(4, FullDiskEngine(exc), {"step": 4}, {"rng": 1}, 0, "model: {}\n")
    assert not list(tmp_path.glob(".tmp_*"))
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert mgr.latest_valid() == good


def test_space_is_checked_before_writing_when_the_size_is_known(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    save(mgr, 2)
    size = sum(p.stat().st_size for p in (tmp_path / "step_00000002").iterdir())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=size // 2))

    class MustNotWrite:
        def save(self, directory):
            raise AssertionError("wrote although the space was known to be too small")

    with pytest.raises(
        CheckpointError,
        match=r"step 4 .*not enough space \(needs ~.* [MG]B, .* free\); step_00000002 is intact",
    ):
        mgr.save(4, MustNotWrite(), {"step": 4}, {"rng": 1}, 0, "model: {}\n")
    assert not list(tmp_path.glob(".tmp_*"))


def test_other_write_errors_are_one_line_too(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, is_main=True)
    with pytest.raises(
        CheckpointError, match=r"step 2 .*PermissionError: denied; no earlier checkpoint exists"
    ):
        mgr.save(2, FullDiskEngine(PermissionError("denied")), {"step": 2}, {"rng": 1}, 0, "model: {}\n")
    assert not list(tmp_path.glob(".tmp_*"))


def test_second_ctrl_c_exits_at_once(monkeypatch, capfd):
    """The stop request's handler: the first SIGINT asks for a checkpoint, the second exits with 130."""
    import os
    import signal

    from llmtrain.train.signals import StopRequest

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    # SIGINT as in a terminal even when pytest runs as a background job (SIGINT inherited ignored, which
    # StopRequest keeps ignored on purpose)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT" and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    finally:
        stop.uninstall()
        signal.signal(signal.SIGINT, previous)
    err = capfd.readouterr().err
    assert "SIGINT received: stopping after this step with a checkpoint (Ctrl-C again" in err
    assert "second Ctrl-C: exiting now, without a checkpoint" in err


def test_an_ignored_ctrl_c_stays_ignored():
    """A process started with SIGINT ignored (nohup, `cmd &` in a script) keeps it so, as Python does."""
    import signal

    from llmtrain.train.signals import StopRequest

    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest().install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.uninstall()
    finally:
        signal.signal(signal.SIGINT, saved)

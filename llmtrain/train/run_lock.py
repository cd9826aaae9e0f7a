"""One training process per run dir: rank 0 holds an exclusive flock on <run dir>/.llmtrain.train.lock from
before anything of the run is written there until the run ends, so a second run of the same dir is refused
instead of interleaving metrics.jsonl and overwriting checkpoints.

Not slurm/job_body.sh's `.llmtrain.lock`: the job's batch shell holds that one, and its ranks (not its
children) must still get this one. The file holds the holder's PID and host for the refusal line. It stays
after the run: deleting it would let a later run lock a new file while a waiting one holds the old one.
"""

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llmtrain.errors import UserError

LOCK_FILE = ".llmtrain.train.lock"
HELD_ELSEWHERE = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}

_held: dict[Path, int | None] = {}  # run dir (resolved) -> its lock file's fd; None: the fs has no locks


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its PID yet"


def _held_elsewhere(run_dir: Path, path: Path, fd: int) -> UserError:
    return UserError(
        f"hydra.run.dir={run_dir}: another run is training there ({_holder(fd)} holds {path}); wait for it "
        "to end (or stop it), or choose another hydra.run.dir"
    )


def _flock(fd: int, how: int, tries: int) -> None:
    """flock, non-blocking; retried briefly: `refuse_if_held`'s probe holds a lock for microseconds."""
    for i in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in HELD_ELSEWHERE or i == tries - 1:
                raise
            time.sleep(0.05)


def refuse_if_held(run_dir: Path) -> None:
    """Raise `acquire`'s refusal where another process holds `run_dir` now; creates and writes nothing
    (before planning: no time is spent hashing checkpoints that run is still writing and pruning)."""
    if Path(run_dir).resolve() in _held:
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has held it
    try:
        _flock(fd, fcntl.LOCK_SH, tries=1)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        if e.errno in HELD_ELSEWHERE:
            raise _held_elsewhere(run_dir, path, fd) from None
    finally:
        os.close(fd)


def acquire(run_dir: Path) -> bool:
    """Lock `run_dir` (created if missing) for this process; False where this process already holds it.

    Another process holding it: UserError naming the dir and the holder. A file system without flock
    (ENOLCK, EOPNOTSUPP, ...): a warning line, and the run goes on unlocked."""
    key = Path(run_dir).resolve()
    if key in _held:
        return False
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # a directory or an unreadable file in its place, a read-only run dir
        raise UserError(
            f"hydra.run.dir={run_dir}: cannot open its lock file {path} ({e.strerror}); remove or fix it, or "
            "choose another hydra.run.dir"
        ) from None
    try:
        _flock(fd, fcntl.LOCK_EX, tries=5)
    except OSError as e:
        if e.errno in HELD_ELSEWHERE:
            error = _held_elsewhere(run_dir, path, fd)
            os.close(fd)
            raise error from None
        os.close(fd)
        print(
            f"warning: cannot lock {path} ({e.strerror}: no locks on this file system?); nothing stops a "
            f"second run from training in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        _held[key] = None
        return True
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = fd
    return True


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for a forked child that shares the open file
        os.close(fd)


def release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """The lock of `run_dir` for the block (a no-op where this process holds it already)."""
    acquired = acquire(run_dir)
    try:
        yield
    finally:
        if acquired:
            release(run_dir)

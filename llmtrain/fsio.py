"""A write that the file system refuses (read-only, no permission, no space, over quota) as one error line.

`writing(target, fix)` wraps the code that writes `target` (a file, a directory or a path prefix) and turns
such an OSError -- or a Rust library's `... (os error N)`, as safetensors raises -- into CannotWrite:
`cannot write PATH: <reason> (N MB free where the disk is full); <fix>`. Other errors pass through unchanged.
"""

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from llmtrain.errors import UserError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY = {errno.EROFS}
NO_PERMISSION = {errno.EACCES, errno.EPERM}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


class CannotWrite(UserError):
    """A write the file system refused; `path`, `reason` and `fix` are kept so a caller can name its own fix."""

    def __init__(self, path, reason: str, fix: str):
        self.path, self.reason, self.fix = str(path), reason, fix
        super().__init__(f"cannot write {self.path}: {reason}; {fix}")

    def with_fix(self, fix: str) -> "CannotWrite":
        """The same problem with the caller's fix (e.g. the config key to change)."""
        return CannotWrite(self.path, self.reason, fix)


def free_mb(path) -> float | None:
    """Free space (MB) of the file system holding `path` (its nearest existing ancestor); None if unknown."""
    p = Path(path).expanduser().absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free / (1 << 20)
            except OSError:
                return None
    return None


def _errno(exc: BaseException) -> int | None:
    """The errno of a refused write anywhere in the exception's chain, also where only its text has it:
    Rust's `(os error N)` (safetensors), `[Errno N]` inside a wrapper (torch.distributed.checkpoint's
    CheckpointException), or torch.save's short write on a full disk, which it reports only as
    `unexpected pos` / `file write failed` (as train/checkpoint.py reads it too)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        text = str(exc)
        if m := _RUST_OS_ERROR.search(text) or _ERRNO_TEXT.search(text):
            return int(m.group(1))
        if any(marker in text for marker in _TORCH_SHORT_WRITE):
            return errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def no_space(exc: BaseException) -> bool:
    """A full disk (or quota) anywhere in the exception's chain: an OSError's errno, its text as a wrapper
    or safetensors carries it, or torch.save's short write."""
    chain = exc
    while chain is not None:
        if (isinstance(chain, OSError) and chain.errno in NO_SPACE) or "No space left" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return _errno(exc) in NO_SPACE


def _concerns(filename, target: Path) -> bool:
    """Whether `filename` (from the OSError) is `target`, inside it, a name beginning with it (PREFIX.lock),
    one of its ancestors (a directory made for it) or a sibling named after it (`.NAME.tmp-PID`): a permission
    error elsewhere (reading an input) is not about the output."""
    if filename is None:
        return True
    f = os.path.abspath(os.fsdecode(filename))
    t = os.path.abspath(target)
    sibling = os.path.dirname(f) == os.path.dirname(t) and os.path.basename(t) in os.path.basename(f)
    return f.startswith(t) or t.startswith(f.rstrip(os.sep) + os.sep) or sibling


def write_error(
    exc: BaseException, target, fix: str, no_space_fix: str | None = None, shown=None
) -> CannotWrite | None:
    """The one-line error for `exc` raised while writing `target`, or None if it is not a refused write;
    `no_space_fix` replaces `fix` where the disk is full (e.g. to say that rerunning resumes); `shown` is the
    path to name (default: the file that failed, else `target`)."""
    code = _errno(exc)
    filename = getattr(exc, "filename", None)
    if code in NO_PERMISSION and not _concerns(filename, Path(target).expanduser()):
        return None
    if code not in NO_SPACE | READ_ONLY | NO_PERMISSION:
        return None
    path = shown or (os.fsdecode(filename) if filename is not None else Path(target).expanduser())
    reason = os.strerror(code)
    if code in NO_SPACE:
        free = free_mb(path)
        if free is not None:
            reason += f" ({free:.0f} MB free)" if free >= 10 else f" ({free:.2f} MB free)"
        fix = no_space_fix or fix
    return CannotWrite(path, reason, fix)


@contextmanager
def writing(target, fix: str, no_space_fix: str | None = None, shown=None) -> Iterator[None]:
    """Turn a refused write inside the block into one error line naming the path, the reason and `fix`."""
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        err = write_error(e, target, fix, no_space_fix, shown)
        if err is None:
            raise
        raise err from None


def check_writable_dir(path, fix: str) -> None:
    """Before long work whose result goes to the file `path`: its directory exists and takes writes."""
    parent = Path(path).expanduser().absolute().parent
    if not parent.is_dir():
        raise CannotWrite(path, f"{parent} is not a directory", fix)
    if not os.access(parent, os.W_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
        raise CannotWrite(path, os.strerror(errno.EROFS if read_only else errno.EACCES), fix)


def write_text_atomic(path, text: str, fix: str) -> None:
    """`path` gets `text` whole or keeps what it had: a full disk leaves no truncated file behind."""
    out = Path(path).expanduser()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with writing(out, fix, shown=out):
        try:
            tmp.write_text(text)
            os.replace(tmp, out)
        except BaseException:
            with suppress(OSError):
                tmp.unlink()
            raise

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
from contextlib import contextmanager
from pathlib import Path

from llmtrain.errors import UserError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY = {errno.EROFS}
NO_PERMISSION = {errno.EACCES, errno.EPERM}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class CannotWrite(UserError):
    """A write the file system refused; `path`, `reason` and `fix` are kept so a caller can name its own fix."""

    def __init__(self, path, reason: str, fix: str):
        self.path, self.reason, self.fix = str(path), reason, fix
        super().__init__(f"cannot write {self.path}: {reason}; {fix}")

    def with_fix(self, fix: str) -> "CannotWrite":
        """The same problem with the caller's fix (e.g. the config key to change)."""
        return CannotWrite(self.path, self.reason, fix)


def free_mb(path) -> int | None:
    """Free space (MB) of the file system holding `path` (its nearest existing ancestor); None if unknown."""
    p = Path(path).expanduser().absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free // (1 << 20)
            except OSError:
                return None
    return None


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    m = _RUST_OS_ERROR.search(str(exc))
    return int(m.group(1)) if m else None


def _concerns(filename, target: Path) -> bool:
    """Whether `filename` (from the OSError) is `target`, inside it, a name beginning with it (PREFIX.lock)
    or one of its ancestors (a directory made for it): a permission error elsewhere is not about the output."""
    if filename is None:
        return True
    f = os.path.abspath(os.fsdecode(filename))
    t = os.path.abspath(target)
    return f.startswith(t) or t.startswith(f.rstrip(os.sep) + os.sep)


def write_error(exc: BaseException, target, fix: str, no_space_fix: str | None = None) -> CannotWrite | None:
    """The one-line error for `exc` raised while writing `target`, or None if it is not a refused write;
    `no_space_fix` replaces `fix` where the disk is full (e.g. to say that rerunning resumes)."""
    code = _errno(exc)
    filename = getattr(exc, "filename", None)
    if code in NO_PERMISSION and not _concerns(filename, Path(target).expanduser()):
        return None
    if code not in NO_SPACE | READ_ONLY | NO_PERMISSION:
        return None
    path = os.fsdecode(filename) if filename is not None else str(Path(target).expanduser())
    reason = os.strerror(code)
    if code in NO_SPACE:
        free = free_mb(path)
        reason += f" ({free} MB free)" if free is not None else ""
        fix = no_space_fix or fix
    return CannotWrite(path, reason, fix)


@contextmanager
def writing(target, fix: str, no_space_fix: str | None = None) -> Iterator[None]:
    """Turn a refused write inside the block into one error line naming the path, the reason and `fix`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        err = write_error(e, target, fix, no_space_fix)
        if err is None:
            raise
        raise err from None

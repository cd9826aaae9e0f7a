"""Third-party warnings (torch, Transformer Engine, Megatron, Hydra, ...) go to the run's log file, and the
console gets one short line per distinct warning, so it shows llmtrain's own lines. llmtrain's own warnings
(e.g. a skipped non-finite step) are shown as before."""

import contextlib
import sys
import textwrap
import warnings
from pathlib import Path

LOG_NAME = "train.log"  # also Hydra's log file (hydra.job.name=train in configs/train.yaml)
_WARNINGS_MODULES = ("warnings", "_py_warnings", __name__)


def issuer_module() -> str:
    """The module whose code called warnings.warn, seen from inside a showwarning hook. Not the frame that
    `stacklevel` names: a library's deprecation warning points at its caller, which may be llmtrain."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _WARNINGS_MODULES:
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


def is_llmtrain(module: str) -> bool:
    return module == "llmtrain" or module.startswith("llmtrain.")


@contextlib.contextmanager
def route_third_party_warnings(log_path: Path, *, rank: int = 0, echo: bool = True):
    """While active, a warning issued outside llmtrain is appended to `log_path` in full; with `echo`, its
    first occurrence (per origin, category and first line) is also one line on stderr."""
    previous = warnings.showwarning
    shown: set[tuple] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        origin = issuer_module()
        if origin.startswith("importlib"):  # compiling a module on import (SyntaxWarning): name the file
            origin = filename
        if is_llmtrain(origin):
            previous(message, category, filename, lineno, file, line)
            return
        text = warnings.formatwarning(message, category, filename, lineno, line)
        with contextlib.suppress(OSError), open(log_path, "a") as f:
            f.write(f"[rank {rank}] {origin}: {text}" if rank else f"{origin}: {text}")
        first = (str(message).strip().splitlines() or [category.__name__])[0]
        key = (origin, category, first)
        if echo and key not in shown:
            shown.add(key)
            short = textwrap.shorten(first, 160, placeholder=" ...")
            print(f"warning ({origin}): {short} (details in {log_path})", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous

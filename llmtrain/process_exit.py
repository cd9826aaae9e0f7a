"""How an llmtrain command ends its process: as Python normally does, except after torch.distributed was used.

There, the interpreter's finalization can abort the process (exit 134, `terminate called without an active
exception`; pytorch/pytorch#190489). Gloo's worker threads drop each finished collective a moment after the
caller's `wait()` returns; when the Python side already let go of that collective's tensor, dropping it takes
the GIL, and a thread that asks for the GIL once finalization has begun is ended by `pthread_exit`, which
C++ turns into `std::terminate`. `destroy_process_group()` does not prevent it: a gloo group that DDP has
held is not freed by it (torch 2.13), so its workers outlive it. A rank that trained and checkpointed
correctly then reported 134, and a cancelled SLURM job looked like a crash. So such a process runs what a
normal exit runs (threading's exit hooks, non-daemon threads joined, atexit handlers: logging, wandb, our
signal disposition), flushes stdout and stderr, and leaves with `os._exit`, skipping only the finalization.
"""

import atexit
import contextlib
import os
import sys
import threading


def used_torch_distributed() -> bool:
    """Whether this process created or joined a torch.distributed group (never imports torch itself)."""
    ours = sys.modules.get("llmtrain.dist")
    if ours is not None and ours.groups_made() > 0:
        return True
    c10d = sys.modules.get("torch.distributed")
    return c10d is not None and c10d.is_available() and c10d.is_initialized()


def exit_status(code) -> int:
    """The status `sys.exit(code)` would give: None is 0, an int is itself, anything else is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_process(code=0) -> None:
    """End this process with `code` (as `sys.exit` takes it); see the module docstring for why not always
    through `sys.exit`."""
    if not used_torch_distributed():
        sys.exit(code)
    status = exit_status(code)
    # What Py_FinalizeEx runs before finalizing, in its order (private, no public equivalents): the threading
    # module's exit hooks (they stop idle concurrent.futures workers, which a plain join would wait on
    # forever), joining the non-daemon threads, then the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(status)


def run_and_exit(main) -> None:
    """Run a command's `main()` and end the process with its status (its return value or its SystemExit)."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    exit_process(code)

"""Graceful stop: SIGTERM / SIGUSR1 (SLURM's warning signal) / Ctrl-C ask the loop to checkpoint and exit 0.

The CLI installs the handlers as it starts (`install_early`), so a signal during start-up or the checkpoint
load is not a silent exit 143: it is acknowledged in one line and the loop stops before its first step. A
second Ctrl-C exits at once (code 130) without a checkpoint.
"""

import atexit
import os
import signal

INTERRUPT_EXIT = 130


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopRequest":
        if not self.installed:
            for sig in self.SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (nohup, `cmd &` in a script): keep it so
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            os.write(2, b"\nsecond Ctrl-C: exiting now, without a checkpoint\n")
            os._exit(INTERRUPT_EXIT)
        if self.signal_name is None:
            again = " (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{name} received: stopping after this step with a checkpoint{again}\n".encode())
        self.signal_name = name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signal_name = None


_PROCESS = StopRequest()


def _ignore_warning_signal_at_exit() -> None:
    # Python's finalization resets a signal with a Python handler to SIG_DFL (terminate), but leaves an
    # ignored one ignored. The SLURM job body re-sends its warning (USR1) until the ranks are gone, so a
    # rank that already stopped for it must not die of the next one while it shuts down (exit 138).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def install_early() -> StopRequest:
    """The process-wide stop request, installed now (the CLI calls this first; it stays for the process)."""
    if not _PROCESS.installed:
        atexit.register(_ignore_warning_signal_at_exit)
    return _PROCESS.install()


def stop_request() -> tuple[StopRequest, bool]:
    """(the process-wide stop request, whether the caller installed it and so must uninstall it)."""
    owner = not _PROCESS.installed
    return _PROCESS.install(), owner

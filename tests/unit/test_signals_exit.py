"""A rank that installed the stop handlers must not die of a late SIGUSR1 while it shuts down.

CPython's finalization resets a signal that has a Python handler to SIG_DFL (terminate) but leaves an
ignored one ignored; the SLURM job body re-sends its warning signal until the ranks are gone (this killed
a rank with exit 138 right after it had stopped cleanly). So by the end of the atexit hooks, USR1 must be
ignored."""

import subprocess
import sys

CHILD = """
import atexit, signal
# registered first, so it runs last of the atexit hooks
atexit.register(lambda: print("ignored at exit:", signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN))
from llmtrain.train.signals import install_early
install_early()
"""


def test_the_warning_signal_is_ignored_once_the_process_exits():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ignored at exit: True" in done.stdout, done.stdout

"""tests/helpers.run_cli_in_process: reports what `python -m llmtrain` would, and leaves no state behind."""

import logging
import os
import signal
import sys
import time
import warnings

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from llmtrain import cli
from llmtrain.train import signals
from tests.helpers import run_cli_in_process


def process_state() -> dict:
    root = logging.getLogger()
    return {
        "cwd": os.getcwd(),
        "argv": sys.argv[:],
        "env": dict(os.environ),
        "threads": torch.get_num_threads(),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
        "stop_request": signals._PROCESS.installed,  # else train() later thinks the CLI installed it
        "root_logging": (root.handlers[:], root.level),
        "hydra": GlobalHydra.instance().is_initialized(),
        "warnings": (warnings.filters[:], warnings.showwarning),
        "plan": cli._PLAN,
    }


def test_a_run_leaves_the_test_process_as_it_found_it(tmp_path):
    before = process_state()
    # Through Hydra's job (its logging, the run dir) and the CLI's signal handlers, but cheap: a dry run.
    proc = run_cli_in_process("recipe=llama3_8b", "dry_run=true", f"hydra.run.dir={tmp_path}", check=True)
    assert "global 512 = micro 1" in proc.stdout
    assert (tmp_path / "train.log").is_file()  # Hydra's job logging ran (a dry run writes no .hydra/)
    assert process_state() == before


def test_a_crash_is_exit_1_with_its_traceback_and_warnings_reach_stderr(monkeypatch):
    def preflight(argv):
        warnings.warn("shown as a subprocess would show it", UserWarning, stacklevel=1)
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "preflight", preflight)
    proc = run_cli_in_process("--cfg", "job")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert "UserWarning: shown as a subprocess would show it" in proc.stderr


def test_a_hung_run_fails_its_test_after_the_timeout(monkeypatch):
    monkeypatch.setattr(cli, "preflight", lambda argv: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0\.5 s"):
        run_cli_in_process("--cfg", "job", timeout=0.5)
    assert time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0

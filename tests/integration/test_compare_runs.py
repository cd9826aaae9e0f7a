import subprocess
import sys

import pytest

from tests.helpers import FAST, REPO, cli_env, run_cli


def compare(*args):
    return subprocess.run(
        [sys.executable, "scripts/compare_runs.py", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )


def test_compare_runs_on_a_two_point_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        *FAST,
        "train.steps=6",
        "train.eval_interval=3",
        "optim.lr=1e-3,1e-2",
        f"hydra.sweep.dir={sweep}",
        check=True,
    )
    out = tmp_path / "cmp"
    proc = compare(sweep, "--baseline", "optim.lr=0.001", "--out", out, "--window", "2")
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text()
    assert "| optim.lr=0.001 | 6 |" in table and "| optim.lr=0.01 | 6 |" in table
    baseline_row = next(line for line in table.splitlines() if line.startswith("| optim.lr=0.001 "))
    assert "+0.00%" in baseline_row
    other_row = next(line for line in table.splitlines() if line.startswith("| optim.lr=0.01 "))
    assert "+0.00%" not in other_row  # a 10x learning rate changes the loss
    for png in ("loss_curves.png", "loss_gap.png"):
        assert (out / png).stat().st_size > 10_000


def test_compare_runs_errors_are_one_line(tmp_path):
    proc = compare(tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no runs")
    run_cli(*FAST, "train.steps=2", f"hydra.run.dir={tmp_path / 'r'}", check=True)
    proc = compare(tmp_path / "r", "--baseline", "fp8_cs", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "matches none of: bf16" in proc.stderr

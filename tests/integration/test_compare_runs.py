import json
import re
import subprocess
import sys

import pytest

from llmtrain.analysis.runs import find_runs
from tests.helpers import FAST, REPO, cli_env, read_metrics, run_cli_in_process


def compare(*args):
    return subprocess.run(
        [sys.executable, "scripts/compare_runs.py", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )


def row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def gap(value: float, base: float) -> str:
    return f"{100 * (value - base) / base:+.2f}%"


def test_compare_runs_on_bf16_vs_fp4_all_the_way(tmp_path):
    """Two small runs of one sweep: table numbers recomputed from metrics.jsonl, QAF step, the plots."""
    pytest.importorskip("matplotlib")
    sweep = tmp_path / "sweep"
    run_cli_in_process(
        "-m",
        *FAST,
        "train.steps=6",
        "train.eval_interval=3",
        "precision.monitor.interval=2",
        "precision=bf16,study/nvfp4_fp4all_qaf_fraction",  # QAF at ceil(0.9 * 6) = step 6; label: basename
        f"hydra.sweep.dir={sweep}",
        check=True,
    )
    out = tmp_path / "cmp"
    proc = compare(sweep, "--baseline", "bf16", "--out", out, "--window", "2")
    assert proc.returncode == 0, proc.stderr
    table = (out / "table.md").read_text()
    assert table in proc.stdout

    base, fp4 = (read_metrics(sweep / str(i)) for i in (0, 1))
    base_train, fp4_train = (sum(r["loss"] for r in m[-2:]) / 2 for m in (base, fp4))
    base_val, fp4_val = (m[-1]["val_loss"] for m in (base, fp4))
    # columns: run, steps, train, gap, val, val gap, tokens/s, QAF step
    base_row, fp4_row = row(table, "bf16"), row(table, "nvfp4_fp4all_qaf_fraction")
    assert base_row[1:6] == ["6", f"{base_train:.4f}", "+0.00%", f"{base_val:.4f}", "+0.00%"]
    assert fp4_row[1:6] == [
        "6", f"{fp4_train:.4f}", gap(fp4_train, base_train), f"{fp4_val:.4f}", gap(fp4_val, base_val)
    ]  # fmt: skip
    assert fp4_row[3] != "+0.00%"  # FP4 everywhere changes the loss
    assert all(re.fullmatch(r"[1-9][\d,]*", r[6]) for r in (base_row, fp4_row))  # tokens/s
    assert (base_row[7], fp4_row[7]) == ("-", "6")  # QAF step
    for png in ("loss_curves.png", "loss_gap.png", "sqrt3.png"):
        assert (out / png).stat().st_size > 10_000


def _fake_run(path, losses, precision):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": v, "tokens_per_s": 100.0}) for i, v in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "config.yaml").write_text(f"precision:\n  name: {precision}\n")


def test_runs_in_job_order_with_distinct_labels(tmp_path):
    for job in (10, 2):
        _fake_run(tmp_path / "sweep" / str(job), [3.0, 2.0], "bf16")
    runs = find_runs([tmp_path / "sweep"])
    assert [r.path.name for r in runs] == ["2", "10"]  # not string order
    assert [r.label for r in runs] == ["bf16 (sweep/2)", "bf16 (sweep/10)"]


def test_compare_runs_errors_are_one_line(tmp_path):
    proc = compare(tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no runs")
    run_cli_in_process(*FAST, "train.steps=2", f"hydra.run.dir={tmp_path / 'r'}", check=True)
    proc = compare(tmp_path / "r", "--baseline", "fp8_cs", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "matches none of: bf16" in proc.stderr
    proc = compare(tmp_path / "r", "--window", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--window 0" in proc.stderr

"""A run with a precision schedule: the phase in metrics.jsonl and on the console, the phase's own LR,
and an exact resume from a checkpoint taken inside the phase."""

import pytest

from llmtrain.train.schedule import learning_rate
from tests.helpers import FAST, losses, read_metrics, run_cli_in_process

ARGS = [*FAST, "train.steps=10", "train.checkpoint_interval=2", "train.keep_last=5",
        "precision=schedule/nvfp4_fp4all_qaf", "precision.schedule.0.fraction=0.3",  # the last 3 of 10 steps
        "precision.monitor.interval=3"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qaf")
    proc = run_cli_in_process(*ARGS, f"hydra.run.dir={run_dir}", check=True)
    return run_dir, proc


def test_appended_qaf_phase_is_logged_and_resets_the_lr(reference):
    run_dir, proc = reference
    records = read_metrics(run_dir)
    assert [r["phase"] for r in records] == ["base"] * 7 + ["qaf"] * 3
    assert [r["step"] for r in records if r.get("phase_switch") == "qaf"] == [7]
    assert [r["step"] for r in records if r.get("qaf_switch")] == [7]
    assert (
        "step 7: precision phase 'qaf' (trigger append) from step 8: fprop x=nvfp4 w=nvfp4 | dgrad dy=hp"
        in (proc.stdout)
    )
    peak = 3e-3  # recipe tiny's optim.lr; the phase warms up over 40 iterations from its first step
    assert [r["lr"] for r in records[7:]] == pytest.approx([peak / 40, 2 * peak / 40, 3 * peak / 40])
    # The base cosine runs over the 7 steps before the appended phase, not over train.steps=10.
    base = [learning_rate(i, lr=peak, min_lr=3e-4, warmup=2, total=7, schedule="cosine") for i in range(7)]
    assert [r["lr"] for r in records[:7]] == pytest.approx(base)


def test_resume_inside_the_phase_repeats_the_run_exactly(reference, tmp_path):
    run_dir, _ = reference
    ckpt = run_dir / "checkpoints" / "step_00000008"
    proc = run_cli_in_process(*ARGS, f"train.resume={ckpt}", f"hydra.run.dir={tmp_path}", check=True)
    assert "precision phase 'qaf' (since step 7)" in proc.stdout
    resumed = read_metrics(tmp_path)
    ref = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [9, 10]
    assert [(r["loss"], r["lr"], r["phase"]) for r in resumed] == [
        (r["loss"], r["lr"], r["phase"]) for r in ref[8:]
    ]
    assert losses(tmp_path) == losses(run_dir)[8:]

"""Resuming an older checkpoint of the same run dir is refused (it would discard the newer ones); branching
into a new run dir works; a missing or dangling `latest` is a warning, not a silent choice."""

from tests.helpers import FAST, losses, read_metrics, run_cli_in_process
from tests.integration.test_resume import tree_digest

ARGS = [*FAST, "train.checkpoint_interval=2"]


def train_8_steps(run_dir):
    run_cli_in_process(*ARGS, "train.steps=8", "train.keep_last=0", f"hydra.run.dir={run_dir}", check=True)


def test_resuming_an_older_checkpoint_of_the_same_run_dir_is_refused_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    train_8_steps(run_dir)
    before = tree_digest(run_dir)
    step2 = run_dir / "checkpoints" / "step_00000002"
    proc = run_cli_in_process(*ARGS, "train.steps=3", f"train.resume={step2}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "step_00000004, step_00000006, step_00000008" in lines[0]
    assert f"hydra.run.dir=NEW_DIR train.resume={step2}" in lines[0]
    assert tree_digest(run_dir) == before  # .hydra/, config.yaml, checkpoints, metrics: as they were
    # the newest checkpoint itself, named as a step dir, is no rewind
    newest = run_dir / "checkpoints" / "step_00000008"
    run_cli_in_process(
        *ARGS, "train.steps=9", f"train.resume={newest}", f"hydra.run.dir={run_dir}", check=True
    )


def test_the_fix_it_names_branches_into_a_new_run_dir_and_leaves_the_old_one(tmp_path):
    run_dir, branch = tmp_path / "run", tmp_path / "branch"
    train_8_steps(run_dir)
    before = tree_digest(run_dir)
    step2 = run_dir / "checkpoints" / "step_00000002"
    run_cli_in_process(*ARGS, "train.steps=8", f"train.resume={step2}", f"hydra.run.dir={branch}", check=True)
    assert [r["step"] for r in read_metrics(branch)] == [3, 4, 5, 6, 7, 8]
    assert losses(branch) == losses(run_dir)[2:]  # the same training, continued exactly
    assert (branch / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert tree_digest(run_dir) == before
    # the branch then resumes itself by default
    proc = run_cli_in_process(*ARGS, "train.steps=9", f"hydra.run.dir={branch}", check=True)
    assert f"resumed from {branch / 'checkpoints' / 'step_00000008'}" in proc.stdout


def test_a_dangling_or_missing_latest_warns_and_resumes_the_newest(tmp_path):
    run_dir = tmp_path / "run"
    train_8_steps(run_dir)
    pointer = run_dir / "checkpoints" / "latest"
    pointer.write_text("step_00000003\n")  # as the rewind bug left it: a pruned step
    proc = run_cli_in_process(*ARGS, "train.steps=9", f"hydra.run.dir={run_dir}", check=True)
    assert (
        f"{pointer} points to step_00000003, which is not a checkpoint; trying step_00000008" in proc.stderr
    )
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000008'}" in proc.stdout
    pointer.unlink()
    proc = run_cli_in_process(*ARGS, "train.steps=10", f"hydra.run.dir={run_dir}", check=True)
    assert f"{pointer} is missing or unreadable; trying the newest step dir, step_00000009" in proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000009'}" in proc.stdout

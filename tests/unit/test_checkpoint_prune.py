"""keep_last prunes this run's own older checkpoints, never the one just written, `latest`, or a newer branch."""

from llmtrain.checkpoint_format import read_latest
from llmtrain.train.checkpoint import CheckpointManager
from tests.unit.test_checkpoint import save


def names(mgr: CheckpointManager) -> list[str]:
    return [p.name for p in mgr.step_dirs()]


def test_a_checkpoint_older_than_the_newest_is_kept_with_latest_naming_it(tmp_path):
    first = CheckpointManager(tmp_path, keep_last=0, is_main=True)
    for step in (2, 4, 6, 8):
        save(first, step)
    mgr = CheckpointManager(tmp_path, keep_last=3, is_main=True)
    written = save(mgr, 3)  # as a run resumed from step 2 saves it
    assert written.is_dir() and read_latest(tmp_path) == "step_00000003"
    # 2 and 3 are this run's newest three up to step 3; 4, 6, 8 are the other branch's, left alone
    assert names(mgr) == ["step_00000002", "step_00000003", "step_00000004", "step_00000006", "step_00000008"]


def test_keep_last_one_keeps_only_the_checkpoint_just_written_below_it(tmp_path):
    first = CheckpointManager(tmp_path, keep_last=0, is_main=True)
    for step in (1, 2, 6):
        save(first, step)
    mgr = CheckpointManager(tmp_path, keep_last=1, is_main=True)
    save(mgr, 3)
    assert names(mgr) == ["step_00000003", "step_00000006"]
    save(mgr, 4)
    assert names(mgr) == ["step_00000004", "step_00000006"]
    assert read_latest(tmp_path) == "step_00000004"

"""The torch engine on one GPU: BF16 autocast, finite and decreasing losses, exact resume."""

import pytest

from tests.helpers import FAST, losses, run_cli

pytestmark = pytest.mark.gpu

GPU = [*FAST, "engine=torch", "train.device=cuda", "optim.lr=3e-3"]


def test_trains_on_cuda_with_bf16_autocast(tmp_path):
    proc = run_cli(*GPU, "train.steps=20", f"hydra.run.dir={tmp_path}", check=True)
    assert "torch cuda bf16 autocast" in proc.stdout
    values = losses(tmp_path)
    assert all(v == v for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.1


def test_resume_on_cuda_matches_uninterrupted(tmp_path):
    import shutil

    args = [*GPU, "train.steps=8", "train.checkpoint_interval=4", f"hydra.run.dir={tmp_path}"]
    run_cli(*args, check=True)
    reference = losses(tmp_path)
    # Roll the run back to its step-4 checkpoint, as if it had been killed there, and resume.
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    proc = run_cli(*args, check=True)
    assert "resumed from" in proc.stdout
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-4)

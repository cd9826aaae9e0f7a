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


def test_probe_runs_in_the_training_bf16_autocast():
    """Every gradient pass of the sqrt(3) probe sees the BF16 autocast training uses (it ran in FP32)."""
    import torch

    from llmtrain.dist import DistInfo
    from llmtrain.engines.megatron_engine.batches import mock_batches
    from llmtrain.engines.torch_engine import TorchEngine
    from llmtrain.precision import quantized_layers
    from tests.megatron_helpers import make_config

    engine = TorchEngine(
        make_config("tiny", "nvfp4_fp4all", overrides={"train": {"device": "cuda"}}), DistInfo()
    )
    seen = []
    layer = next(iter(quantized_layers(engine.model).values()))
    layer.register_forward_pre_hook(lambda *_: seen.append(torch.get_autocast_dtype("cuda")
                                                           if torch.is_autocast_enabled("cuda") else None))  # fmt: skip
    batches = mock_batches(2, 2, 256, 4096)
    probe = engine.probe_quantization_noise(batches, 1)
    assert len(seen) == 4 * len(batches) and set(seen) == {torch.bfloat16}  # 4 passes x 2 micro-batches
    assert all(0 < probe.metrics[k] < float("inf") for k in ("backward", "sr", "grad_norm"))
    assert 0 < probe.ratios["all"] < float("inf")


def test_val_loss_bf16_on_cuda(tmp_path):
    run_cli(*GPU, "precision=nvfp4_fp4all", "precision.qaf.trigger=off", "train.steps=4", "train.eval_interval=2",
            "precision.monitor.interval=1", f"hydra.run.dir={tmp_path}", check=True)  # fmt: skip
    from tests.helpers import read_metrics

    records = read_metrics(tmp_path)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(
        r["val_loss_bf16"] == r["val_loss_bf16"] and r["val_loss_bf16"] != r["val_loss"] for r in evals
    )
    assert [r["step"] for r in records if "sqrt3/all" in r] == [1, 2, 3]

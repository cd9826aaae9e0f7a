"""Megatron engine on one GPU: build + step per precision, checkpoint round trip, native-recipe errors.

Data is mock (random tokens). Run on the GPU host: `pytest -m gpu tests/gpu -s`.
Set LLMTRAIN_TEST_RESULTS=<file.jsonl> to have the numbers appended there.
"""

import math
import os

import pytest
import torch

from llmtrain.engines.base import DistInfo
from llmtrain.engines.megatron_engine.testing import dispose, make_config, mock_batches, record
from llmtrain.errors import UserError

pytestmark = pytest.mark.gpu

# Deterministic TE attention kernels, so a resumed run repeats an uninterrupted one bit for bit.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")


def engine_for(precision="bf16", parallel="single", model="tiny", overrides=None):
    from llmtrain.engines.megatron_engine import MegatronEngine

    return MegatronEngine(make_config(model, precision, parallel, overrides), DistInfo())


@pytest.mark.parametrize("precision", ["bf16", "fp8_cs"])
def test_build_and_step(precision):
    engine = engine_for(precision)
    batches = mock_batches(2, 2, 256, 4096)
    results = [engine.train_step(batches, lr=1e-3) for _ in range(8)]  # same batches: loss must drop
    losses = [r.loss for r in results]
    record(
        f"step_{precision}",
        {
            "backend": engine.backend_description,
            "losses": losses,
            "grad_norms": [r.grad_norm for r in results],
            **engine.memory_stats(),
        },
    )
    assert abs(losses[0] - math.log(4096)) < 0.5  # ~ln(vocab) at init
    assert all(math.isfinite(r.grad_norm) and not r.skipped for r in results)
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(engine.eval_loss(batches))
    assert ("FP8" in engine.backend_description) == (precision == "fp8_cs")
    dispose(engine)


@pytest.mark.parametrize("precision", ["mxfp8", "nvfp4", "nvfp4_fp4all"])
def test_block_scaled_recipes_train_native_or_emulated(precision):
    """Blackwell runs TE's native MXFP8/NVFP4; elsewhere (and for knobs TE lacks) our Triton quantizers."""
    over = {"precision": {"bf16_layers": {"last": 1}}} if precision == "nvfp4" else None
    engine = engine_for(precision, overrides=over)
    batches = mock_batches(2, 2, 256, 4096)
    results = [engine.train_step(batches, lr=1e-3) for _ in range(8)]
    losses = [r.loss for r in results]
    native = torch.cuda.get_device_capability() >= (10, 0) and precision != "nvfp4_fp4all"
    record(f"step_{precision}", {"backend": engine.backend_description, "losses": losses})
    assert ("emulated" in engine.backend_description) != native, engine.backend_description
    assert all(math.isfinite(r.grad_norm) and not r.skipped for r in results)
    assert losses[-1] < losses[0] - 0.5
    dispose(engine)


def test_native_backend_refuses_what_this_gpu_cannot_run():
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("Blackwell runs MXFP8/NVFP4 natively")
    with pytest.raises(UserError, match=r"precision\.backend=custom") as info:
        engine_for("mxfp8", overrides={"precision": {"backend": "native"}})
    record("error_native_mxfp8", {"message": str(info.value)})


def test_emulated_monitor_and_qaf_switch():
    """sqrt(3) probe: finite per-layer ratios; QAF then trains with the backward in BF16."""
    engine = engine_for("nvfp4_fp4all")
    batches = mock_batches(2, 2, 256, 4096)
    for step in (1, 2):
        engine.begin_step(step)
        engine.train_step(batches, lr=1e-3)
    ratios = engine.probe_quantization_noise(batches[0])
    assert set(ratios) == {
        *(
            f"layers.{i}.{m}"
            for i in range(4)
            for m in (
                "self_attention.linear_qkv",
                "self_attention.linear_proj",
                "mlp.linear_fc1",
                "mlp.linear_fc2",
            )
        ),
        "all",
    }
    assert all(0 < v < float("inf") for v in ratios.values()), ratios
    engine.set_qaf(True)
    ratios_qaf = engine.probe_quantization_noise(batches[0])
    engine.begin_step(3)
    r = engine.train_step(batches, lr=1e-3)
    record("monitor_nvfp4_fp4all", {"ratios": ratios, "after_qaf_loss": r.loss})
    assert math.isfinite(r.loss) and not r.skipped
    assert all(0 < v < float("inf") for v in ratios_qaf.values())  # the probe sets its own mode
    from llmtrain.precision import te_custom

    assert te_custom.STATE.qaf  # the probe put the QAF flag back
    dispose(engine)


def test_skips_non_finite_update():
    engine = engine_for()
    batches = mock_batches(1, 2, 256, 4096)
    engine.train_step(batches, lr=1e-3)
    with torch.no_grad():
        next(engine.models[0].parameters()).fill_(float("nan"))  # poison the embedding
    r = engine.train_step(batches, lr=1e-3)
    assert r.skipped
    dispose(engine)


@pytest.mark.parametrize("parallel", ["single", "megatron_8b"])
def test_checkpoint_exact_resume(tmp_path, parallel):
    """Save after 2 steps; a fresh engine that loads it repeats steps 3-4 of the uninterrupted run."""
    batches = [mock_batches(2, 2, 256, 4096, seed=s) for s in range(4)]
    engine = engine_for("bf16", parallel)
    for b in batches[:2]:
        engine.train_step(b, lr=1e-3)
    engine.save(tmp_path)
    straight = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]
    dispose(engine)

    engine = engine_for("bf16", parallel, overrides={"train": {"seed": 99}})  # different init, then load
    engine.load(tmp_path)
    resumed = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]
    dispose(engine)
    record(f"resume_{parallel}", {"uninterrupted": straight, "resumed": resumed})
    assert (tmp_path / "megatron" / "metadata.json").is_file()
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-6)


def test_missing_checkpoint_is_one_line(tmp_path):
    from llmtrain.errors import CheckpointError

    engine = engine_for()
    with pytest.raises(CheckpointError, match="no Megatron-Core checkpoint"):
        engine.load(tmp_path)
    dispose(engine)

"""Emulated formats on the Megatron engine: each weight is quantized once per optimizer step (TE's weight
workspace cache, driven by Megatron-Core's is_first_microbatch), and the cache changes no result."""

import os

import pytest
import torch

from llmtrain.dist import DistInfo
from llmtrain.engines.megatron_engine.batches import mock_batches
from tests.megatron_helpers import dispose, make_config, record

pytestmark = pytest.mark.gpu
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")

MICRO_BATCHES = 4


def _train(precision: str, cache: bool, steps: int = 2, one_pass: bool = False, qaf_steps=()):
    """(loss, grad norm) per step, quantize calls per step, and the GPU memory the engine holds between
    steps (weights, grads, optimizer state, TE's weight workspaces). `qaf_steps`: step indices run with
    te_custom's QAF switch on (the backward directions, dgrad_w included, in high precision)."""
    from llmtrain.precision import te_custom

    default, te_custom.ONE_PASS, te_custom.STATE.one_pass_calls = te_custom.ONE_PASS, one_pass, 0
    try:
        result = _train_steps(precision, cache, steps, set(qaf_steps))
    finally:
        te_custom.ONE_PASS = default
        te_custom.set_qaf(False)
    if one_pass:  # the pair path ran: weights (cached or not), grad_output and the inputs (no SP here)
        assert te_custom.STATE.one_pass_calls > 0
    return result


def _train_steps(precision: str, cache: bool, steps: int, qaf_steps: set):
    from llmtrain.engines.megatron_engine import MegatronEngine
    from llmtrain.precision import te_custom

    start = torch.cuda.memory_allocated()
    over = {
        "precision": {"bf16_layers": {"first": 0, "last": 0}},
        "train": {"micro_batch_size": 1, "global_batch_size": MICRO_BATCHES},
    }
    engine = MegatronEngine(make_config("tiny", precision, "single", over), DistInfo())
    if not engine.emulated:
        dispose(engine)
        pytest.skip(f"{precision} runs natively here: {engine.backend_description}")
    if not cache:  # TE then quantizes the weight on every micro-batch (is_first_microbatch=None)
        for model in engine.models:
            for m in model.modules():
                if hasattr(m, "disable_parameter_transpose_cache"):
                    m.disable_parameter_transpose_cache = True
    batches = mock_batches(steps * MICRO_BATCHES, 1, 256, 4096, seed=3)
    losses, calls = [], []
    for step in range(steps):
        te_custom.STATE.quantize_calls.clear()
        te_custom.set_qaf(step in qaf_steps)
        engine.begin_step(step + 1)
        r = engine.train_step(batches[step * MICRO_BATCHES : (step + 1) * MICRO_BATCHES], lr=1e-3)
        losses.append((r.loss, r.grad_norm))
        calls.append(dict(te_custom.STATE.quantize_calls))
    resident = torch.cuda.memory_allocated() - start
    dispose(engine)
    return losses, calls, resident


@pytest.mark.parametrize("precision", ["mxfp8", "nvfp4"])
def test_weights_quantized_once_per_step_and_results_unchanged(precision):
    cached, calls, _ = _train(precision, cache=True)
    plain, calls_plain, _ = _train(precision, cache=False)
    record(f"weight_cache_{precision}", {"calls_cached": str(calls), "calls_uncached": str(calls_plain),
                                         "losses_cached": cached, "losses_uncached": plain})  # fmt: skip
    for c in calls:
        linears = c[("input", "rowwise")] // MICRO_BATCHES  # one input quantization per micro-batch
        assert linears > 0 and c[("input", "rowwise")] == linears * MICRO_BATCHES
        assert c[("weight", "rowwise")] == linears, c  # fprop W: once per step
        assert c[("weight", "columnwise")] == linears, c  # dgrad W^T: once per step
    for c in calls_plain:
        assert c[("weight", "rowwise")] == c[("input", "rowwise")], c  # without the cache: every micro-batch
    assert cached == plain


def test_the_factorys_quantizers_are_custom_to_te_and_stay_so_when_copied():
    """Real TE 2.20: is_custom() on the factory's quantizers (TE then all-gathers a sequence-parallel input in
    BF16 and quantizes it once) and on their copies; stochastic rounding is not requantization-safe."""
    pytest.importorskip("transformer_engine.pytorch")
    from transformer_engine.pytorch.tensor.utils import is_custom

    from llmtrain.precision import te_custom
    from llmtrain.precision.recipe import Operand, PrecisionRecipe

    te_custom.set_recipe(PrecisionRecipe(fprop_x=Operand("nvfp4"), wgrad_x=Operand("nvfp4", "stochastic")))
    for tensor_type in ("input", "weight", "grad_output"):
        q = te_custom.qfactory(type("Role", (), {"module_type": "linear", "tensor_type": tensor_type})())
        assert is_custom(q) and is_custom(q.copy()), tensor_type
    q = te_custom.qfactory(type("Role", (), {"module_type": "linear", "tensor_type": "input"})())
    q.set_usage(rowwise=False, columnwise=True)
    assert not q.is_requantization_safe()  # the column-wise (wgrad) operand draws new SR bits each time


@pytest.fixture(scope="module")
def first_engine_built():
    """The first engine of a process most likely leaves memory allocated for the process (H100, 2026-12-07:
    MXFP8's two-call run, the process's first engine, held 205.9 MB resident; NVFP4's, built later, 104.6
    MB, as much as MXFP8's one-pass run), which would count as the measured run's own: one engine first,
    unmeasured."""
    _train("nvfp4", cache=True, steps=1)


@pytest.mark.parametrize("precision", ["mxfp8", "nvfp4"])
def test_one_pass_over_both_layouts_changes_no_result(precision, first_engine_built):
    """te_custom.ONE_PASS: one pair-kernel pass where TE asks for both layouts of a tensor; the losses and
    gradient norms equal the two-call path's bit for bit (same seeds, same order), with or without the
    weight cache (update_quantized), and the quantize calls are counted the same."""
    for cache in (True, False):
        two, calls_two, resident_two = _train(precision, cache=cache)
        one, calls_one, resident_one = _train(precision, cache=cache, one_pass=True)
        record(f"one_pass_{precision}_cache{int(cache)}",
               {"two": two, "one": one, "resident_two": resident_two, "resident_one": resident_one})  # fmt: skip
        assert one == two, (cache, one, two)
        assert calls_one == calls_two
        if cache and precision == "nvfp4":  # 16x16 weights: one BF16 workspace buffer serves both GEMMs
            assert resident_one < resident_two, (resident_one, resident_two)


def test_one_pass_workspace_shared_by_both_layouts_splits_when_a_refresh_no_longer_serves_both():
    """ONE_PASS keeps one cached buffer for both layouts of an NVFP4 16x16 weight. A refresh under QAF
    (dgrad_w passes through in BF16) must give the column-wise layout its own buffer: written into the
    shared one, the raw weight replaced the quantized fprop weight. Losses equal the two-call path's."""
    two = _train("nvfp4", cache=True, steps=3, qaf_steps={1})[0]
    one = _train("nvfp4", cache=True, steps=3, one_pass=True, qaf_steps={1})[0]
    record("one_pass_qaf_refresh", {"two": two, "one": one})
    assert one == two, (one, two)

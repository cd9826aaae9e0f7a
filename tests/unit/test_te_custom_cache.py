"""te_custom's FakeQuantizer refreshing TE's cached weight workspace, on the CPU with TE's two quantizer base
classes stubbed (as TE 2.20 defines the parts used here) and the Triton kernels in the interpreter."""

import importlib
import sys
import types

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class _IdentityQuantizer:
    """TE 2.20's IdentityQuantizer, the parts FakeQuantizer inherits."""

    def __init__(self, *, dtype=None, rowwise=True, columnwise=True):
        self.dtype, self.rowwise_usage, self.columnwise_usage = dtype, rowwise, columnwise
        self.internal = self.optimize_for_gemm = False

    def _maybe_cast(self, tensor):
        return tensor.detach()

    def update_quantized(self, src, dst, *, noop_flag=None):
        data = self._maybe_cast(src)
        hp = dst._hp_data
        if hp is not None and (hp.shape, hp.dtype, hp.device) == (data.shape, data.dtype, data.device):
            hp.copy_(data)
        else:
            dst._hp_data = data.detach()
        return dst


class _HybridQuantizer:
    """TE 2.20's HybridQuantizer, the parts used here: its copy() builds a plain HybridQuantizer."""

    def __init__(self, *, rowwise_quantizer, columnwise_quantizer, columnwise_source="original"):
        self.rowwise_quantizer, self.columnwise_quantizer = rowwise_quantizer, columnwise_quantizer
        self.columnwise_source = columnwise_source

    def copy(self):
        return _HybridQuantizer(
            rowwise_quantizer=self.rowwise_quantizer.copy(),
            columnwise_quantizer=self.columnwise_quantizer.copy(),
            columnwise_source=self.columnwise_source,
        )


def _is_custom(q) -> bool:
    """TE 2.20's transformer_engine.pytorch.tensor.utils.is_custom."""
    return hasattr(q, "custom") and q.custom


@pytest.fixture
def te_custom(monkeypatch):
    stubs = {
        "transformer_engine": types.ModuleType("transformer_engine"),
        "transformer_engine.pytorch": types.ModuleType("transformer_engine.pytorch"),
        "transformer_engine.pytorch.tensor": types.ModuleType("transformer_engine.pytorch.tensor"),
        "transformer_engine.pytorch.tensor.hybrid_tensor": types.ModuleType("hybrid_tensor"),
        "transformer_engine.pytorch.tensor.identity_tensor": types.ModuleType("identity_tensor"),
    }
    stubs["transformer_engine.pytorch.tensor.hybrid_tensor"].HybridQuantizer = _HybridQuantizer
    stubs["transformer_engine.pytorch.tensor.identity_tensor"].IdentityQuantizer = _IdentityQuantizer
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    import llmtrain.precision as package

    monkeypatch.delitem(sys.modules, "llmtrain.precision.te_custom", raising=False)
    monkeypatch.delattr(package, "te_custom", raising=False)  # restored (if there was one) afterwards
    module = importlib.import_module("llmtrain.precision.te_custom")
    yield module
    sys.modules.pop("llmtrain.precision.te_custom", None)  # the stubbed module must not outlive the test
    if hasattr(package, "te_custom"):
        delattr(package, "te_custom")


def _weight():
    buffer = torch.randn(3 * 64 * 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return buffer[64 * 48 : 2 * 64 * 48].view(64, 48)  # a view into a parameter buffer, as Megatron's DDP


def test_refresh_writes_the_quantized_weight_into_the_cached_buffer(te_custom):
    from llmtrain.precision.recipe import Operand, PrecisionRecipe
    from llmtrain.precision.triton_kernels import fake_quantize_2d

    te_custom.set_recipe(PrecisionRecipe(fprop_w=Operand("nvfp4", block_2d=True)))
    q = te_custom.FakeQuantizer("fprop_w", 1, role="weight")
    w = _weight()
    workspace = types.SimpleNamespace(_hp_data=q._maybe_cast(w))
    cached = workspace._hp_data
    with torch.no_grad():
        w.mul_(-0.5)  # the optimizer step
    q.update_quantized(w, workspace)
    assert workspace._hp_data is cached
    assert torch.equal(cached, fake_quantize_2d(w, "nvfp4", axis=1, block_2d=True))
    assert te_custom.STATE.quantize_calls[("weight", "rowwise")] == 2


def test_a_workspace_made_in_qaf_aliases_the_weight_and_is_replaced_not_written(te_custom):
    from llmtrain.precision.recipe import Operand, PrecisionRecipe
    from llmtrain.precision.triton_kernels import fake_quantize_2d

    te_custom.set_recipe(PrecisionRecipe(dgrad_w=Operand("nvfp4")))
    q = te_custom.FakeQuantizer("dgrad_w", 0, backward=True, role="weight")  # dgrad W^T
    w = _weight()
    te_custom.set_qaf(True)
    workspace = types.SimpleNamespace(_hp_data=q._maybe_cast(w))  # QAF passes the weight through
    assert workspace._hp_data.data_ptr() == w.data_ptr()
    te_custom.set_qaf(False)
    before = w.clone()
    q.update_quantized(w, workspace)
    assert torch.equal(w, before)  # TE's plain copy_ would have written quantized values into the weight
    assert torch.equal(workspace._hp_data, fake_quantize_2d(w, "nvfp4", axis=0))


@pytest.mark.parametrize(
    "name,axis,rht", [("fprop_x", 1, False), ("dgrad_w", 0, False), ("wgrad_dy", 0, True)]
)
def test_a_format_without_a_triton_kernel_runs_the_torch_reference(te_custom, monkeypatch, name, axis, rht):
    """MXFP4 has no Triton kernel (registry: triton=False): the same FakeQuantizer path quantizes it with
    the torch quantizer (kernel_check.reference, RHT included), and the kernels are never called."""
    from llmtrain.precision import emulate, kernel_check, triton_kernels
    from llmtrain.precision.hadamard import TE_SIGNS
    from llmtrain.precision.recipe import Operand, PrecisionRecipe

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton kernel was selected for mxfp4")

    monkeypatch.setattr(triton_kernels, "fake_quantize_2d", no_kernel)
    te_custom.set_recipe(PrecisionRecipe(**{name: Operand("mxfp4")}, rht=rht))
    q = te_custom.FakeQuantizer(name, axis, backward=axis == 0, role="input")
    w = _weight()
    signs = torch.tensor(TE_SIGNS) if rht else None
    want = kernel_check.reference(w, "mxfp4", axis, "nearest", False, signs, 0, 8, w.dtype)
    assert torch.equal(q._maybe_cast(w), want)
    workspace = types.SimpleNamespace(_hp_data=torch.empty_like(w))
    cached = workspace._hp_data
    q.update_quantized(w, workspace)  # writes into TE's cached buffer, as the kernels' `out=` does
    assert workspace._hp_data is cached and torch.equal(cached, want)
    with pytest.raises(
        ValueError, match=r"fmt='mxfp4': allowed values are fp8_e4m3, fp8_e5m2, mxfp8, nvfp4$"
    ):
        triton_kernels._check(w, triton_kernels.Direction("mxfp4"), 8, None)  # the kernels refuse it
    assert emulate.fake_quantize_2d is te_custom.fake_quantize_2d


def test_the_factorys_input_quantizer_is_custom_so_te_gathers_in_bf16_and_quantizes_once(te_custom):
    """With sequence parallelism TE quantizes each rank's input shard before the all-gather unless the
    quantizer is custom (is_custom); then it gathers BF16 and quantizes the gathered tensor once, as the torch
    engine does. The flag must survive TE's copy(), which builds a plain HybridQuantizer."""
    from llmtrain.precision.recipe import Operand, PrecisionRecipe

    te_custom.set_recipe(PrecisionRecipe(fprop_x=Operand("nvfp4"), wgrad_x=Operand("nvfp4"), rht=True))
    role = types.SimpleNamespace(module_type="linear", tensor_type="input")
    q = te_custom.qfactory(role)
    assert _is_custom(q) and _is_custom(q.copy())
    assert isinstance(q.copy(), _HybridQuantizer)


@pytest.mark.parametrize("quantized", ["wgrad_x", "wgrad_dy"])
def test_a_bf16_wgrad_operand_gets_the_rht_when_the_other_one_is_quantized(te_custom, quantized):
    """RHT on, one wgrad operand quantized, the other left in BF16: the torch engine transforms both
    (precision/linear.py), so dW = (H dy)^T Q(H x) ~ dy^T x. The BF16 one passed through untransformed gave
    dy^T (H x) instead."""
    from llmtrain.precision.hadamard import TE_SIGNS, hadamard
    from llmtrain.precision.recipe import Operand, PrecisionRecipe

    te_custom.set_recipe(PrecisionRecipe(**{quantized: Operand("nvfp4")}, rht=True))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g).to(torch.bfloat16)  # [tokens, in]
    dy = torch.randn(64, 32, generator=g).to(torch.bfloat16)  # [tokens, out]
    qx = te_custom.FakeQuantizer("wgrad_x", 0, backward=True, role="input")._maybe_cast(x)
    qdy = te_custom.FakeQuantizer("wgrad_dy", 0, backward=True, role="grad_output")._maybe_cast(dy)
    bf16_side, bf16_out = (dy, qdy) if quantized == "wgrad_x" else (x, qx)
    want = hadamard(bf16_side.t(), 16, torch.tensor(TE_SIGNS)).t()
    assert torch.equal(bf16_out, want)  # the transform, exactly as the torch engine applies it
    exact = dy.double().t() @ x.double()
    got = qdy.double().t() @ qx.double()
    assert (got - exact).norm() / exact.norm() < 0.3  # FP4 noise of one operand; untransformed: ~1.4
    te_custom.set_qaf(True)  # QAF: both wgrad operands pass through, neither is transformed
    assert torch.equal(te_custom.FakeQuantizer("wgrad_x", 0, backward=True)._maybe_cast(x), x)
    assert torch.equal(te_custom.FakeQuantizer("wgrad_dy", 0, backward=True)._maybe_cast(dy), dy)
    te_custom.set_qaf(False)

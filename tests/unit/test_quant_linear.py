"""QuantLinear: the right operands are quantized along the right dimension in each of the three GEMMs,
gradients agree with a float64 reference within the noise quantization predicts, QAF, RHT, SR."""

import pytest
import torch
from torch import nn

from llmtrain.precision import PrecisionConfig, PrecisionRecipe, QuantLinear, fake_quantize, hadamard
from llmtrain.precision.hadamard import TE_SIGNS

# (weight, activation, grad) formats, weight 2-D tiles
SETUPS = {
    "fp8_cs": ("fp8_e4m3", "fp8_e4m3", "fp8_e5m2", False),
    "mxfp8": ("mxfp8", "mxfp8", "mxfp8", False),
    "nvfp4": ("nvfp4", "nvfp4", "nvfp4", True),
    "nvfp4_1d": ("nvfp4", "nvfp4", "nvfp4", False),
}


def _cfg(setup, **kw):
    w, a, g, w2d = SETUPS[setup]
    return PrecisionConfig(name="nvfp4", weight_format=w, activation_format=a, grad_format=g,
                           weight_block_2d=w2d, **kw)  # fmt: skip


def _layer(cfg, k=64, n=48, seed=0):
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return QuantLinear(lin, PrecisionRecipe.from_config(cfg), seed=seed)


def _data(m=(2, 16), k=64, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m, k, generator=g) * torch.exp(torch.randn(*m, 1, generator=g) * 0.5)
    dy = torch.randn(*m, n, generator=g) * 1e-3
    return x, dy


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("rht", [False, True])
def test_each_gemm_quantizes_its_operands_along_the_reduction_dim(setup, rht):
    w_fmt, a_fmt, g_fmt, w2d = SETUPS[setup]
    layer = _layer(_cfg(setup, rht=rht))
    x, dy = _data()
    y, dx, dw = _run(layer, x, dy)
    w, x2, dy2 = layer.weight.detach(), x.reshape(-1, 64), dy.reshape(-1, 48)

    def fq(t, fmt, block_2d=False):
        return fake_quantize(t.contiguous(), fmt, block_2d=block_2d)

    y_ref = fq(x2, a_fmt) @ fq(w, w_fmt, w2d).t()  # fprop: blocks along in_features
    dx_ref = fq(dy2, g_fmt) @ fq(w.t(), w_fmt, w2d).t()  # dgrad: blocks along out_features
    a, b = dy2.t(), x2.t()  # wgrad: blocks along tokens, after the RHT if on
    if rht:
        a, b = hadamard(a, 16, torch.tensor(TE_SIGNS)), hadamard(b, 16, torch.tensor(TE_SIGNS))
    dw_ref = fq(a, g_fmt) @ fq(b, a_fmt).t()
    # Same quantized values; only FP32 rounding (where the per-tensor scales are applied, summation
    # order) differs, so agreement is to ~1e-6 of the largest output.
    for got, ref in ((y.reshape(-1, 48), y_ref), (dx.reshape(-1, 64), dx_ref), (dw, dw_ref)):
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_gradients_vs_float64_within_quantization_noise(setup):
    """||C_q - C|| / ||C|| for each GEMM C = A B^T vs float64, against the first-order prediction
    sqrt(||dA B^T||^2 + ||A dB^T||^2) / ||C|| from the operands' own quantization errors dA, dB."""
    w_fmt, a_fmt, g_fmt, w2d = SETUPS[setup]
    layer = _layer(_cfg(setup))
    x, dy = _data(m=(4, 32))
    y, dx, dw = _run(layer, x, dy)
    w = layer.weight.detach().double()
    x2, dy2 = x.reshape(-1, 64).double(), dy.reshape(-1, 48).double()

    def predicted(a, a_fmt_, b, b_fmt_, b2d=False):
        da = fake_quantize(a.float().contiguous(), a_fmt_).double() - a
        db = fake_quantize(b.float().contiguous(), b_fmt_, block_2d=b2d).double() - b
        c = a @ b.t()
        return ((da @ b.t()).norm() ** 2 + (a @ db.t()).norm() ** 2).sqrt().item() / c.norm().item()

    cases = [
        (y.reshape(-1, 48), x2 @ w.t(), predicted(x2, a_fmt, w, w_fmt, w2d)),
        (dx.reshape(-1, 64), dy2 @ w, predicted(dy2, g_fmt, w.t(), w_fmt, w2d)),
        (dw, dy2.t() @ x2, predicted(dy2.t(), g_fmt, x2.t(), a_fmt)),
    ]
    for name, (got, exact, pred) in zip(("fprop", "dgrad", "wgrad"), cases):
        err = _rel(got, exact)
        assert 0.5 * pred < err < 1.5 * pred, (name, err, pred)


def test_stochastic_rounding_makes_gradients_unbiased():
    """SR on the gradient operand: the mean dgrad over many draws converges to dy @ Q(W) (exact dy)."""
    layer = _layer(_cfg("nvfp4_1d", dgrad_rounding="stochastic", wgrad_rounding="stochastic"))
    x, dy = _data()
    draws = []
    for _ in range(200):
        _, dx, _ = _run(layer, x, dy)
        draws.append(dx.reshape(-1, 64))
        layer.weight.grad = None
    target = dy.reshape(-1, 48) @ fake_quantize(layer.weight.detach().t().contiguous(), "nvfp4").t()
    single = _rel(draws[0], target)
    mean = _rel(torch.stack(draws).mean(0), target)
    assert single > 0.05 and mean < 0.25 * single  # 1/sqrt(200) ~ 0.07 expected
    assert not torch.equal(draws[0], draws[1])


def test_sr_operands_all_rounds_weight_and_activation_stochastically_in_backward():
    layer = _layer(_cfg("nvfp4_1d", dgrad_rounding="stochastic", sr_operands="all"))
    r = layer.recipe
    assert r.dgrad_w.rounding == "stochastic" and r.fprop_w.rounding == "nearest"
    grad_only = _layer(_cfg("nvfp4_1d", dgrad_rounding="stochastic")).recipe
    assert grad_only.dgrad_w.rounding == "nearest" and grad_only.dgrad_dy.rounding == "stochastic"


def test_qaf_keeps_forward_quantized_and_runs_backward_in_high_precision():
    layer = _layer(_cfg("nvfp4"))
    x, dy = _data()
    y_q, _, dw_q = _run(layer, x, dy)
    layer.weight.grad = None
    layer.qaf = True
    y, dx, dw = _run(layer, x, dy)
    assert torch.equal(y, y_q)
    w = layer.weight.detach()
    torch.testing.assert_close(dx.reshape(-1, 64), dy.reshape(-1, 48) @ w, rtol=1e-6, atol=0)
    torch.testing.assert_close(dw, dy.reshape(-1, 48).t() @ x.reshape(-1, 64), rtol=1e-6, atol=0)
    assert not torch.allclose(dw, dw_q)


def test_rht_with_token_count_not_multiple_of_16_and_disabled_gemms():
    layer = _layer(_cfg("nvfp4_1d", rht=True))
    x, dy = _data(m=(1, 20))
    _, _, dw = _run(layer, x, dy)
    exact = dy.reshape(-1, 48).double().t() @ x.reshape(-1, 64).double()
    assert _rel(dw, exact) < 0.3
    # GEMMs switched off stay exact.
    layer = _layer(_cfg("nvfp4", quantize_dgrad=False, quantize_wgrad=False))
    _, dx, dw = _run(layer, x, dy)
    torch.testing.assert_close(
        dx.reshape(-1, 64), dy.reshape(-1, 48) @ layer.weight.detach(), rtol=1e-6, atol=0
    )


def test_bf16_autocast_and_dtypes():
    layer = _layer(_cfg("nvfp4"))
    x, dy = _data()
    x = x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all()


def test_rht_under_bf16_autocast_rounds_the_transform_to_bf16():
    """As TE: the wgrad operands are transformed in the GEMM dtype (BF16), i.e. the RHT output is rounded
    to BF16 before its amax and quantization (keeping it FP32 changes ~1% of the FP4 codes)."""
    from llmtrain.precision.quantize import quantize_parts

    layer = _layer(_cfg("nvfp4_1d", rht=True))
    x, dy = _data()
    dy = dy.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy)
    signs = torch.tensor(TE_SIGNS)
    a = hadamard(dy.reshape(-1, 48).t().contiguous(), 16, signs)
    b = hadamard(x.reshape(-1, 64).t().contiguous().bfloat16(), 16, signs)
    assert a.dtype == b.dtype == torch.bfloat16
    pa, pb = quantize_parts(a, "nvfp4", "nearest"), quantize_parts(b, "nvfp4", "nearest")
    # the GEMM as linear._gemm emulates TE's: FP32 accumulation, per-tensor factors, one rounding to BF16
    ref = ((pa.values.float() @ pb.values.float().t()) * (pa.factor * pb.factor)).bfloat16()
    assert torch.equal(layer.weight.grad, ref.float())


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_operand_reaches_the_loss_and_the_gradients(setup, bad):
    """Native TE ignores NaN in its amax and saturates Inf (S_enc = 1), so a GEMM could turn a non-finite
    input into finite numbers. We make the scale NaN instead: the output and the gradients the operand
    feeds are non-finite, and the loop's check (non-finite loss or grad norm => skip) fires."""
    layer = _layer(_cfg(setup, rht=True))
    x, dy = _data()
    x_bad = x.clone()
    x_bad[0, 3, 5] = bad
    y, dx, dw = _run(layer, x_bad, dy)
    assert not torch.isfinite(y).all() and not torch.isfinite(dw).all()
    layer.weight.grad = None
    dy_bad = dy.clone()
    dy_bad[1, 2, 7] = bad
    y, dx, dw = _run(layer, x, dy_bad)
    assert torch.isfinite(y).all()  # the forward never saw it
    assert not torch.isfinite(dx).all() and not torch.isfinite(dw).all()


def test_sr_bits_reaches_the_layer():
    """precision.sr_bits=24 (unbiased draw) gives other stochastic roundings than the default 8 bits."""
    x, dy = _data()
    grads = {}
    for bits in (8, 24):
        cfg = _cfg("nvfp4", dgrad_rounding="stochastic", wgrad_rounding="stochastic", sr_bits=bits)
        layer = _layer(cfg)
        assert layer.recipe.sr_bits == bits
        grads[bits] = _run(layer, x, dy)
    assert any(not torch.equal(a, b) for a, b in zip(grads[8], grads[24]))

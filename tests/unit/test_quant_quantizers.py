"""Quantizers: hand-derived golden vectors, properties, edge cases, API contract."""

import math

import pytest
import torch

from llmtrain.precision import FORMATS, dequantize, fake_quantize, hadamard, quantize
from llmtrain.precision.formats import E2M1, E4M3, e2m1_decode, format_grid, unpack_fp4
from llmtrain.precision.hadamard import TE_SIGNS, hadamard_matrix


def _bits(v: float) -> int:
    return torch.tensor([v]).to(torch.float8_e4m3fn).view(torch.uint8).item()


# ---------------------------------------------------------------- golden vectors (derived in comments)


def test_golden_fp8_e4m3_current_scaling():
    # amax 3 -> scale = 448/3 = 149.33; 0.5*s = 74.67 -> 72 (spacing 8 in [64,128)); -1*s = -149.33 ->
    # -144 (spacing 16 in [128,256)); 3*s -> 448. Codes: 72 = 0.1101.001, 144 = 1.1110.001, 448 = 0.1111.110.
    x = torch.tensor([0.5, -1.0, 3.0, 0.0])
    q = quantize(x, "fp8_e4m3")
    assert q.codes.tolist() == [[0x69, 0xF1, 0x7E, 0x00]]
    scale = torch.div(torch.tensor(448.0), torch.tensor(3.0))
    assert q.scale.item() == torch.reciprocal(scale).item()
    assert torch.equal(fake_quantize(x, "fp8_e4m3"), torch.tensor([72.0, -144.0, 448.0, 0.0]) * q.scale)


def test_golden_fp8_e5m2_current_scaling():
    # amax 1000 -> scale 57.344; 1*s -> 56 (spacing 8 in [32,64)); -0.3*s = -17.2 -> -16 (spacing 4);
    # 1000*s = 57344 = max. Codes: 56 = 0.10100.11, -16 = 1.10011.00, 57344 = 0.11110.11.
    q = quantize(torch.tensor([1.0, -0.3, 1000.0]), "fp8_e5m2")
    assert q.codes.tolist() == [[0x53, 0xCC, 0x7B]]


def test_golden_fp8_subnormal_element():
    # x/amax = 2^-15 -> x*scale = 448 * 2^-15 = 7 * 2^-9: the largest E4M3 subnormal, code 0x07.
    q = quantize(torch.tensor([1.0, 2.0**-15]), "fp8_e4m3")
    assert q.codes.tolist() == [[0x7E, 0x07]]


def test_golden_mxfp8():
    # Block 0: amax 10 -> 10/448 = 0.0223 -> scale 2^-5 (code 122); 10*32 = 320 (on the grid, spacing 32),
    #   0.1*32 = 3.2 -> 3.25 (spacing 0.25) -> 0.1015625.
    # Block 1: all zero -> code 0 (2^-127), elements 0.
    # Block 2: amax 448 -> 448 * fp32(1/448) rounds to 1.0 -> scale 1 (code 127), 448 stays 448.
    # Block 3: amax 449 -> scale 2 (code 128); 449/2 = 224.5 -> 224 (spacing 16) -> 448.
    x = torch.zeros(128)
    x[0], x[1], x[2] = 10.0, 0.1, -1.0
    x[64], x[65] = 448.0, 1.5
    x[96], x[97] = 449.0, 3.0
    q = quantize(x, "mxfp8")
    assert q.scale.tolist() == [[122, 0, 127, 128]]
    y = fake_quantize(x, "mxfp8")
    assert y[:3].tolist() == [10.0, 0.1015625, -1.0]
    assert y[64:66].tolist() == [448.0, 1.5] and y[96:98].tolist() == [448.0, 3.0]
    assert (y[32:64] == 0).all()


def test_golden_nvfp4():
    # amax 7: S_enc = 2688/7 = 384, block scale = E4M3(7 * 384/6) = 448, element scale 384/448 = 6/7:
    #   1 -> 0.857 -> 1;  2 -> 1.714 -> 1.5;  3 -> 2.571 -> 3;  6 -> 5.14 -> 6;  0.1 -> 0.0857 -> 0;
    #   -0.2 -> -0.171 -> -0 (code 8);  -7 -> -6;  5 -> 4.29 -> 4.  Decode scale 448*7/2688 = 7/6.
    # Second block: amax 1e-6 -> scale 1e-6*64 underflows E4M3 to 0: the block dequantizes to 0 (its
    #   codes saturate at +-6, as TE's reference does, since x * FP32max clips).
    x = torch.zeros(2, 16)
    x[0, :8] = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.1, -0.2, -7.0, 5.0])
    x[1, 0], x[1, 1] = 1e-6, -1e-6
    q = quantize(x, "nvfp4")
    assert q.amax.item() == 7.0
    assert q.scale.float()[:, 0].tolist() == [448.0, 0.0]
    codes = unpack_fp4(q.codes)
    assert codes[0, :8].tolist() == [2, 3, 5, 7, 0, 8, 15, 6]
    assert q.codes[0, :4].tolist() == [0x32, 0x75, 0x80, 0x6F]
    assert codes[1, :2].tolist() == [7, 15]
    y = fake_quantize(x, "nvfp4")
    step = 7.0 / 6.0
    expected = torch.tensor([1.0, 1.5, 3.0, 6.0, 0.0, 0.0, -6.0, 4.0]) * step
    torch.testing.assert_close(y[0, :8], expected, rtol=2e-7, atol=0)
    assert (y[1] == 0).all()


def test_golden_nvfp4_2d_tile_shares_scale():
    # 16x16 tile: one amax for the whole tile, so a row with small values shares the large row's scale.
    w = torch.full((16, 16), 0.1)
    w[0, 0] = 6.0
    q1, q2 = quantize(w, "nvfp4"), quantize(w, "nvfp4", block_2d=True)
    assert q2.scale.float().unique().tolist() == [448.0]
    assert q1.scale.float()[1:].unique().tolist() != [448.0]
    # 0.1 with the tile scale (1 element unit = 1.0/1): 0.1 -> 0 ; with its own row scale it survives.
    assert (fake_quantize(w, "nvfp4", block_2d=True)[1:] == 0).all()
    assert (fake_quantize(w, "nvfp4")[1:] > 0).all()


# ---------------------------------------------------------------- properties


def _sample(shape=(64, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dequantize_of_quantize_equals_fake_quantize(fmt, rounding):
    x = _sample()
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        q = quantize(xd, fmt, rounding=rounding, generator=torch.Generator().manual_seed(1))
        y = fake_quantize(xd, fmt, rounding=rounding, generator=torch.Generator().manual_seed(1))
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(dequantize(q), y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_codes_are_idempotent(fmt):
    """Re-quantizing a quantized tensor gives it back: exactly (codes) for FP8/MXFP8 scales.

    NVFP4 re-derives each block scale from the *quantized* block amax, which can be smaller than the
    original, so a second pass may pick another scale; there we check the elements sit on the E2M1 grid.
    """
    x = _sample()
    y = fake_quantize(x, fmt)
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        assert torch.equal(quantize(y, fmt).codes, quantize(x, fmt).codes)
    elif fmt in ("mxfp8", "mxfp4"):  # MXFP4: the re-quantized block amax (4 or 6 units) keeps floor(log2)
        assert torch.equal(fake_quantize(y, fmt), y)
    else:
        q = quantize(x, fmt)
        elems = e2m1_decode(unpack_fp4(q.codes))
        assert torch.isin(elems.abs(), format_grid(E2M1)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_unbiased(fmt):
    """Mean of N SR draws -> x. Rows are replicas so every draw sees the same scales.

    Bound: one draw's error has sd <= spacing/2 <= |block max| * 2^-mbits (spacing of the coarsest
    binade the block uses); the mean of N draws must be within 6 of those / sqrt(N) (+ FP32 slack).
    Exception, inherent to NVFP4 (and TE): the E4M3 block scale is rounded to nearest, so when it rounds
    down the block's largest elements land above 6 and saturate deterministically; they are checked apart.
    """
    n = 4000
    x = _sample((4, 64), seed=2)
    reps = x.repeat(n, 1)
    # 24 random bits: unbiased to 2**-24 of a step (the default 8 are biased by <= 1/256 of a step,
    # test_quant_formats checks that rate exactly).
    y = fake_quantize(
        reps, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(0), sr_bits=24
    )
    mean = y.view(n, *x.shape).mean(0)
    mbits = {"fp8_e4m3": 3, "fp8_e5m2": 2, "mxfp8": 3, "nvfp4": 1, "mxfp4": 1}[fmt]
    block = {"fp8_e4m3": 64, "fp8_e5m2": 64, "mxfp8": 32, "nvfp4": 16, "mxfp4": 32}[fmt]
    bmax = x.abs().view(4, -1, block).amax(-1, keepdim=True).expand(-1, -1, block).reshape(x.shape)
    if fmt.startswith("fp8"):
        bmax = x.abs().amax().expand_as(x)
    ok = torch.ones_like(x, dtype=torch.bool)
    if fmt == "nvfp4":
        q = quantize(x, fmt)
        unit = (q.scale.float() * q.amax / 2688).repeat_interleave(16, dim=1)  # value of element 1.0
        ok = x.abs() / unit < 6
        saturated = ~ok
        assert saturated.any()  # this sample has some; they always decode to +-6 units
        assert torch.equal(y.view(n, *x.shape)[:, saturated].std(0), torch.zeros(int(saturated.sum())))
    if fmt == "mxfp4":  # the OCP scale maps the block amax into [4, 8) units: those >= 6 saturate
        unit = torch.ldexp(torch.ones(4, 2), quantize(x, fmt).scale.int() - 127).repeat_interleave(32, dim=1)
        ok = x.abs() / unit < 6
        saturated = ~ok
        assert saturated.any()
        assert torch.equal(y.view(n, *x.shape)[:, saturated].std(0), torch.zeros(int(saturated.sum())))
    sd = bmax * 2.0**-mbits
    assert ((mean - x).abs() <= 6 * sd / n**0.5 + 1e-5 * bmax)[ok].all()
    # And SR actually randomizes (unlike RTN).
    assert not torch.equal(y[: x.shape[0]], y[x.shape[0] : 2 * x.shape[0]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_scales_representable_and_elements_in_range(fmt):
    x = _sample((32, 512), seed=3) * 1e3
    q = quantize(x, fmt)
    y = fake_quantize(x, fmt)
    amax = x.abs().amax()
    if fmt == "nvfp4":
        s = q.scale.float()
        assert q.scale.dtype == torch.float8_e4m3fn and (s >= 0).all() and (s <= 448).all()
        assert torch.isin(s.unique(), format_grid(E4M3)).all()
        assert (e2m1_decode(unpack_fp4(q.codes)).abs() <= 6).all()
        assert (y.abs() <= amax * (1 + 1e-6)).all()
    elif fmt == "mxfp8":
        assert q.scale.dtype == torch.uint8 and (q.scale < 255).all()
        elems = q.codes.view(torch.float8_e4m3fn).float()
        assert torch.isfinite(elems).all() and (elems.abs() <= 448).all()
        # No element saturates: the E8M0 scale is the power of two that maps the block amax to <= 448.
        blocks = x.view(32, -1, 32).abs().amax(-1)
        assert (blocks / torch.ldexp(torch.ones(q.scale.shape), q.scale.int() - 127) <= 448).all()
    elif fmt == "mxfp4":
        assert q.scale.dtype == torch.uint8 and (q.scale < 255).all()
        assert torch.isin(e2m1_decode(unpack_fp4(q.codes)).abs(), format_grid(E2M1)).all()
        # OCP: X = 2**(floor(log2(block amax)) - 2), so the block amax is 4 to 8 units (6 and up saturate).
        units = x.view(32, -1, 32).abs().amax(-1) / torch.ldexp(
            torch.ones(q.scale.shape), q.scale.int() - 127
        )
        assert ((units >= 4) & (units < 8)).all()
    else:
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
        assert (y.abs() <= amax * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_relative_error_in_expected_range(fmt):
    # RMS error of round-to-nearest on Gaussian data: ~2^-mbits/sqrt(12)-ish per element for FP8,
    # larger for FP4 (1 mantissa bit, coarse top binade). Bounds are loose sanity limits, not targets.
    x = _sample((128, 256), seed=4)
    err = ((fake_quantize(x, fmt) - x).norm() / x.norm()).item()
    assert err < {"fp8_e4m3": 0.04, "fp8_e5m2": 0.08, "mxfp8": 0.04, "nvfp4": 0.13, "mxfp4": 0.2}[fmt]
    assert err > 1e-3


def test_2d_weight_blocks_make_transpose_consistent():
    w = _sample((48, 80), seed=5)  # not multiples of 16: padded tiles
    a = fake_quantize(w, "nvfp4", block_2d=True)
    b = fake_quantize(w.t().contiguous(), "nvfp4", block_2d=True).t()
    assert torch.equal(a, b)
    assert not torch.equal(fake_quantize(w, "nvfp4"), fake_quantize(w.t().contiguous(), "nvfp4").t())


def test_hadamard_is_orthogonal_and_preserves_gemm():
    t = hadamard_matrix(16, torch.tensor(TE_SIGNS)).double()
    torch.testing.assert_close(t @ t.t(), torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-15)
    g = torch.Generator().manual_seed(6)
    a, b = (
        torch.randn(24, 64, generator=g, dtype=torch.float64),
        torch.randn(40, 64, generator=g, dtype=torch.float64),
    )
    for signs in (None, torch.tensor(TE_SIGNS)):
        ha, hb = hadamard(a, 16, signs), hadamard(b, 16, signs)
        torch.testing.assert_close(ha @ hb.t(), a @ b.t(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ha.norm(dim=1), a.norm(dim=1), rtol=1e-12, atol=0)
    x32 = a.float()
    assert hadamard(x32).dtype == torch.float32
    # A single outlier is spread over its 16-block: amax drops by sqrt(16).
    spike = torch.zeros(1, 16)
    spike[0, 3] = 8.0
    torch.testing.assert_close(hadamard(spike).abs(), torch.full((1, 16), 2.0))
    with pytest.raises(ValueError, match="multiple"):
        hadamard(torch.ones(2, 20))


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_tensor(fmt):
    x = torch.zeros(4, 64)
    q = quantize(x, fmt)
    assert torch.equal(dequantize(q), x) and (q.codes == 0).all()
    if fmt == "nvfp4":
        assert q.amax.item() == 0 and (q.scale.float() == 0).all()
    elif fmt in ("mxfp8", "mxfp4"):
        assert (q.scale == 0).all()
    else:
        assert q.scale.item() == 1.0  # TE: amax 0 -> scale 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_blocks_inside_nonzero_tensor(fmt):
    x = _sample((4, 64), seed=7)
    x[:, :32] = 0
    x[2] = 0
    y = fake_quantize(x, fmt)
    assert (y[:, :32] == 0).all() and (y[2] == 0).all() and torch.isfinite(y).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_and_huge_amax(fmt):
    """Amax so small that max/amax overflows FP32 (scale clamps to FP32 max) or close to FP32 max."""
    for scale in (1e-38, 1e-30, 1e30, 1e37):
        x = _sample((4, 64), seed=8) * scale
        y = fake_quantize(x, fmt)
        assert torch.isfinite(y).all(), scale
        assert (torch.sign(y) * torch.sign(x) >= 0).all(), scale
        if scale >= 1e-30:  # away from FP32 subnormals the usual accuracy holds
            assert (y - x).double().norm() / x.double().norm() < 0.2, scale


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_propagate(fmt):
    """Documented choice: a non-finite element makes its scale NaN (tensor for fp8/nvfp4, block for mxfp8)."""
    for bad in (math.nan, math.inf, -math.inf):
        x = _sample((2, 64), seed=9)
        x[0, 5] = bad
        y = fake_quantize(x, fmt)
        torch.testing.assert_close(dequantize(quantize(x, fmt)), y, rtol=0, atol=0, equal_nan=True)
        if fmt in ("mxfp8", "mxfp4"):
            assert (
                torch.isnan(y[0, :32]).all()
                and torch.isfinite(y[0, 32:]).all()
                and torch.isfinite(y[1]).all()
            )
        else:
            assert torch.isnan(y).all()


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4", "mxfp4"])
def test_partial_last_block_is_zero_padded(fmt):
    x = _sample((3, 40), seed=10)
    block = 16 if fmt == "nvfp4" else 32
    padded = torch.nn.functional.pad(x, (0, -40 % block))
    assert torch.equal(fake_quantize(x, fmt), fake_quantize(padded, fmt)[:, :40])
    q = quantize(x, fmt)
    assert q.scale.shape == (3, math.ceil(40 / block))
    assert dequantize(q).shape == x.shape


@pytest.mark.parametrize("fmt", FORMATS)
def test_shapes_and_dtypes(fmt):
    for shape in [(), (7,), (2, 3, 32), (0, 16)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(shape).to(dtype)
            y = fake_quantize(x, fmt)
            assert y.shape == x.shape and y.dtype == dtype
            if x.numel():
                assert torch.equal(dequantize(quantize(x, fmt)), y)
    x3 = _sample((4, 64), seed=11).view(2, 2, 64)
    assert torch.equal(fake_quantize(x3, fmt), fake_quantize(x3.reshape(4, 64), fmt).view(2, 2, 64))


def test_bad_arguments():
    x = torch.ones(4, 16)
    with pytest.raises(ValueError, match="fp8_e4m3, fp8_e5m2, mxfp8, nvfp4"):
        fake_quantize(x, "int8")
    with pytest.raises(ValueError, match="nearest, stochastic"):
        fake_quantize(x, "nvfp4", rounding="floor")
    with pytest.raises(ValueError):
        quantize(x, "bf16")
    with pytest.raises(TypeError):
        quantize(torch.ones(4, 16, dtype=torch.int32), "nvfp4")


def test_precision_config_sr_bits_is_validated():
    from llmtrain.errors import ConfigError
    from llmtrain.precision.config import PrecisionConfig
    from llmtrain.precision.recipe import validate

    cfg = PrecisionConfig(name="nvfp4", weight_format="nvfp4", activation_format="nvfp4", grad_format="nvfp4")
    assert cfg.sr_bits == 8
    validate(cfg)
    cfg.sr_bits = 16
    with pytest.raises(ConfigError, match=r"precision.sr_bits=16: not a valid choice \(allowed: 8, 24\)"):
        validate(cfg)


@pytest.mark.parametrize("e4m3_max", [448, 256])
def test_4over6_dequantizes_consistently_and_is_no_worse_per_block(e4m3_max):
    """4over6 keeps, per block, the candidate with the smaller error: its total absolute error is at most
    that of map-to-6 alone (the plain NVFP4 scales of the same tensor scale) plus FP32 slack."""
    from llmtrain.precision.quantize import FourOverSix

    fos = FourOverSix("MAE", e4m3_max)
    x = _sample((64, 256), seed=12)
    y = fake_quantize(x, "nvfp4", four_over_six=fos)
    assert torch.equal(dequantize(quantize(x, "nvfp4", four_over_six=fos)), y)
    if e4m3_max == 448:
        plain = fake_quantize(x, "nvfp4")
        err4o6 = (y - x).abs().view(64, 16, 16).sum(-1)
        err6 = (plain - x).abs().view(64, 16, 16).sum(-1)
        assert (err4o6 <= err6 * (1 + 1e-5)).all() and (err4o6 < err6).any()
    with pytest.raises(ValueError, match="four_over_six needs fmt='nvfp4'"):
        quantize(x, "mxfp8", four_over_six=fos)
    with pytest.raises(ValueError, match="err_mode='L1'"):
        quantize(x, "nvfp4", four_over_six=FourOverSix("L1"))

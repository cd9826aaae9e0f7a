"""MXFP4 (OCP Microscaling v1.0: E2M1 elements, an E8M0 scale per 32) against a small independent reference.

The reference below works on Python floats, one block at a time, from the spec's definition: X =
2**(floor(log2(amax)) - 2) (emax of E2M1 = 2), clamped to E8M0's 2**-127..2**127, elements = the E2M1
value nearest to v / X (ties to the even code, saturating at 6). Our deviation, as for MXFP8: a NaN or Inf
in a block makes its scale NaN (code 255), so the whole block dequantizes to NaN.
"""

import math

import pytest
import torch

from llmtrain.precision import dequantize, fake_quantize, quantize
from llmtrain.precision.formats import e2m1_decode, unpack_fp4
from tests.precision_cases import adversarial_tensors

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by code; even codes have mantissa 0


def _e2m1(s: float) -> float:
    a = min(abs(s), 6.0)
    best = min(range(8), key=lambda i: (abs(GRID[i] - a), i % 2))  # nearest, ties to the even code
    return math.copysign(GRID[best], s)


def _reference_block(block: list[float]) -> tuple[list[float], int]:
    """(dequantized values, E8M0 code) of one block of 32 floats."""
    if any(not math.isfinite(v) for v in block):
        return [math.nan] * len(block), 255
    amax = max(abs(v) for v in block)
    exponent = (
        math.frexp(amax)[1] - 1 if amax else -127
    )  # floor(log2(amax)); frexp: amax = m * 2**e, m in [0.5, 1)
    code = min(max(exponent - 2 + 127, 0), 254)
    x = 2.0 ** (code - 127)
    return [_e2m1(v / x) * x for v in block], code


def reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized FP32 values, E8M0 codes [rows, blocks]) of a 2-D tensor, zero-padding the last block."""
    cols = t.shape[1]
    padded = torch.nn.functional.pad(t.float(), (0, -cols % 32)).tolist()
    values, codes = [], []
    for row in padded:
        out_row, code_row = [], []
        for b in range(0, len(row), 32):
            v, c = _reference_block(row[b : b + 32])
            out_row += v
            code_row.append(c)
        values.append(out_row[:cols])
        codes.append(code_row)
    return torch.tensor(values, dtype=torch.float32), torch.tensor(codes, dtype=torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_independent_reference_on_the_adversarial_set(dtype):
    for name, x in adversarial_tensors(dtype, rows=8, cols=64).items():
        want, codes = reference(x)
        q = quantize(x, "mxfp4")
        assert torch.equal(q.scale, codes), name
        assert _same(fake_quantize(x, "mxfp4").float(), want.to(dtype).float()), name
        assert _same(dequantize(q).float(), want.to(dtype).float()), name


def test_elements_on_the_e2m1_grid_and_scales_powers_of_two():
    x = adversarial_tensors(rows=16, cols=128, names=("wide_range",))["wide_range"]
    q = quantize(x, "mxfp4")
    elems = e2m1_decode(unpack_fp4(q.codes))
    assert torch.isin(elems.abs(), torch.tensor(GRID)).all()
    assert q.codes.shape == (16, 64) and q.scale.shape == (16, 4) and q.scale.dtype == torch.uint8
    # Each block's amax maps into [4, 8) units of its power-of-two scale X (the OCP floor rule).
    units = x.view(16, 4, 32).abs().amax(-1) / torch.ldexp(torch.ones(16, 4), q.scale.int() - 127)
    assert ((units >= 4) & (units < 8)).all()


def test_block_amax_picks_the_scale_and_the_top_of_the_block_saturates():
    x = torch.zeros(1, 64)
    x[0, :32] = torch.linspace(-1, 1, 32)
    x[0, 5] = 7.5  # amax 7.5 -> floor(log2) = 2 -> X = 1: 7.5 saturates to 6, 3.7 -> 4
    x[0, 6] = 3.7
    x[0, 32:] = 0.01  # a second block at its own scale: floor(log2(0.01)) = -7 -> X = 2**-9
    q = quantize(x, "mxfp4")
    assert q.scale.tolist() == [[127, 118]]
    y = fake_quantize(x, "mxfp4")
    assert y[0, 5].item() == 6.0 and y[0, 6].item() == 4.0
    assert torch.equal(y[0, 32:], torch.full((32,), 6 * 2.0**-9))  # 0.01 / 2**-9 = 5.12: nearer 6 than 4
    assert torch.equal(y, reference(x)[0])


def test_zeros_stay_zero_and_an_all_zero_block_gets_the_smallest_scale():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[:, :32] = 0
    q = quantize(x, "mxfp4")
    assert (q.scale[:, 0] == 0).all() and (q.scale[:, 1] > 0).all()  # code 0 = 2**-127
    assert (fake_quantize(x, "mxfp4")[:, :32] == 0).all()
    assert torch.equal(dequantize(quantize(torch.zeros(3, 40), "mxfp4")), torch.zeros(3, 40))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_element_makes_only_its_block_nan(bad):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    x[0, 5] = bad
    q = quantize(x, "mxfp4")
    assert q.scale[0, 0].item() == 255 and (q.scale[0, 1:] < 255).all() and (q.scale[1] < 255).all()
    y = fake_quantize(x, "mxfp4")
    assert torch.isnan(y[0, :32]).all() and torch.isfinite(y[0, 32:]).all() and torch.isfinite(y[1]).all()
    assert _same(dequantize(q), y)


def test_stochastic_rounding_picks_a_grid_neighbour_and_matches_dequantize():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    q = quantize(x, "mxfp4", rounding="stochastic", seed=5)
    y = fake_quantize(x, "mxfp4", rounding="stochastic", seed=5)
    assert torch.equal(dequantize(q), y)
    unit = torch.ldexp(torch.ones(8, 2), q.scale.int() - 127).repeat_interleave(32, dim=1)
    s = x / unit
    grid = torch.tensor(GRID)
    below = grid[(grid.view(1, 1, -1) <= s.abs().clamp_max(6).unsqueeze(-1)).sum(-1) - 1]
    above = grid[((grid.view(1, 1, -1) < s.abs().clamp_max(6).unsqueeze(-1)).sum(-1)).clamp_max(7)]
    got = (y / unit).abs()
    assert ((got == below) | (got == above)).all()
    assert not torch.equal(y, fake_quantize(x, "mxfp4"))  # some element rounded the other way

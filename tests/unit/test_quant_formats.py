"""Element/scale formats: full value tables, rounding onto the grids, E8M0 scale selection."""

import dataclasses
import math

import pytest
import torch

from llmtrain.precision.formats import (
    E2M1,
    E4M3,
    E5M2,
    e2m1_decode,
    e2m1_encode,
    e8m0_from_float_ceil,
    e8m0_reciprocal,
    e8m0_to_float,
    format_grid,
    pack_fp4,
    philox4x32,
    random_bits,
    round_to_format,
    unpack_fp4,
)


def _decode_by_hand(code: int, ebits: int, mbits: int, bias: int) -> float:
    """IEEE-style decode of an 8-bit code (no inf/nan handling: callers add the format's specials)."""
    sign = -1.0 if code >> (ebits + mbits) else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if e == 0:
        return sign * m / 2**mbits * 2.0 ** (1 - bias)
    return sign * (1 + m / 2**mbits) * 2.0 ** (e - bias)


def test_e2m1_full_table():
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    codes = torch.arange(16, dtype=torch.uint8)
    decoded = e2m1_decode(codes)
    assert decoded[:8].tolist() == table
    assert decoded[8:].tolist() == [-v for v in table]
    assert all(math.copysign(1, v) < 0 for v in decoded[8:].tolist())  # code 8 is -0
    assert format_grid(E2M1).tolist() == table
    # Encoding is the inverse on the grid; the sign bit goes to strictly negative inputs only.
    vals = torch.tensor(table + [-v for v in table[1:]])
    assert torch.equal(e2m1_decode(e2m1_encode(vals, vals < 0)), vals)
    assert e2m1_encode(torch.tensor([0.0, -0.0]), torch.tensor([False, False])).tolist() == [0, 0]


def test_e4m3_full_table():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    native = codes.view(torch.float8_e4m3fn).float()
    for c in range(256):
        v = native[c].item()
        if c & 0x7F == 0x7F:  # E4M3FN: only S.1111.111 is NaN, no infinities
            assert math.isnan(v), c
        else:
            assert v == _decode_by_hand(c, 4, 3, 7), c
    finite = native[torch.isfinite(native) & (native >= 0)].unique()
    assert torch.equal(finite, format_grid(E4M3))
    assert len(finite) == 127 and finite.max() == 448.0
    assert native[0x01] == 2.0**-9 and native[0x07] == 7 * 2.0**-9 and native[0x08] == 2.0**-6
    assert native[0x38] == 1.0 and native[0x7E] == 448.0 and native[0xFE] == -448.0


def test_e5m2_full_table():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    native = codes.view(torch.float8_e5m2).float()
    for c in range(256):
        v = native[c].item()
        if c & 0x7F == 0x7C:
            assert v == (math.inf if c < 128 else -math.inf)
        elif c & 0x7F > 0x7C:
            assert math.isnan(v), c
        else:
            assert v == _decode_by_hand(c, 5, 2, 15), c
    finite = native[torch.isfinite(native) & (native >= 0)].unique()
    assert torch.equal(finite, format_grid(E5M2))
    assert native[0x01] == 2.0**-16 and native[0x3C] == 1.0 and native[0x7B] == 57344.0


def test_e8m0_full_table():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = e8m0_to_float(codes)
    assert all(vals[c].item() == 2.0 ** (c - 127) for c in range(255))
    assert math.isnan(vals[255].item())
    rcp = e8m0_reciprocal(codes)
    assert all(rcp[c].item() == 2.0 ** (127 - c) for c in range(255))
    assert math.isnan(rcp[255].item())


def test_e8m0_rounds_up_to_power_of_two():
    exact = torch.ldexp(torch.ones(254), torch.arange(-126, 128))  # normal powers of two
    assert torch.equal(e8m0_from_float_ceil(exact).int(), torch.arange(1, 255, dtype=torch.int32))
    above = torch.nextafter(exact[:-1], torch.tensor(math.inf))
    assert torch.equal(e8m0_from_float_ceil(above).int(), torch.arange(2, 255, dtype=torch.int32))
    # 0 -> 2^-127; FP32 subnormals up to 2^-127 -> 2^-127, above -> 2^-126; beyond 2^127 saturates.
    specials = torch.tensor([0.0, 2.0**-149, 2.0**-127, 2.0**-127 * 1.5, 3e38, math.inf, math.nan])
    assert e8m0_from_float_ceil(specials).tolist() == [0, 0, 0, 1, 254, 255, 255]


def test_fp4_packing_roundtrip():
    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.shape == (3, 16)
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))  # even element in the low nibble
    assert torch.equal(unpack_fp4(packed), codes)


def _generic(fmt):
    return dataclasses.replace(fmt, torch_dtype=None)


@pytest.mark.parametrize("fmt", [E2M1, E4M3, E5M2], ids=lambda f: f.name)
def test_nearest_even_on_grid_midpoints(fmt):
    grid = format_grid(fmt).double()
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    out = round_to_format(mids, _generic(fmt))
    lo, hi = grid[:-1].float(), grid[1:].float()
    # The tie goes to the neighbour with an even mantissa (code), i.e. an even index on the grid.
    idx = torch.arange(len(grid) - 1)
    expected = torch.where(idx % 2 == 0, lo, hi)
    assert torch.equal(out, expected)
    assert torch.equal(round_to_format(-mids, _generic(fmt)), -expected)
    assert torch.equal(round_to_format(grid.float(), fmt), grid.float())  # grid points are fixed points


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_generic_rounding_matches_torch_fp8_cast(fmt):
    g = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.randn(200_000, generator=g) * fmt.max / 4,
        torch.exp(torch.randn(200_000, generator=g) * 6) * torch.sign(torch.randn(200_000, generator=g)),
        torch.linspace(-fmt.max * 1.1, fmt.max * 1.1, 100_001),
    ])  # fmt: skip
    assert torch.equal(round_to_format(v, _generic(fmt)), round_to_format(v, fmt))


@pytest.mark.parametrize("fmt", [E2M1, E4M3, E5M2], ids=lambda f: f.name)
def test_rounding_saturates_and_keeps_nan(fmt):
    v = torch.tensor([fmt.max * 1.01, -1e30, math.inf, -math.inf, math.nan])
    for rounding in ("nearest", "stochastic"):
        out = round_to_format(v, fmt, rounding, torch.full(v.shape, 255))
        assert out[:4].tolist() == [fmt.max, -fmt.max, fmt.max, -fmt.max]
        assert math.isnan(out[4].item())


@pytest.mark.parametrize("fmt", [E2M1, E4M3, E5M2], ids=lambda f: f.name)
def test_rounding_idempotent(fmt):
    v = torch.randn(10_000) * fmt.max / 3
    once = round_to_format(v, fmt)
    assert torch.equal(round_to_format(once, fmt), once)
    sr = round_to_format(v, fmt, "stochastic", random_bits(1, v.numel(), seed=1))
    assert torch.equal(round_to_format(sr, fmt, "stochastic", torch.zeros(v.shape)), sr)  # grid points stay


@pytest.mark.parametrize("sr_bits", [8, 24])
def test_stochastic_rounding_probability_is_exact_over_all_random_bits(sr_bits):
    """P(away from zero) = floor(2**sr_bits * f) / 2**sr_bits exactly, f = position between neighbours.

    8 bits: every one of the 256 random values is tried, so the count of ups is the probability exactly
    (native TE / cvt.rs: f = k/256 + eps rounds up for exactly k of them). 24 bits: the threshold is
    checked at its two sides."""
    n = 2**sr_bits
    for spacing, lo, fmt in ((0.5, 0.0, E2M1), (2.0, 4.0, E2M1), (2.0**-9, 2.0**-6, E4M3)):
        for k in (0, 1, 77, 128, 255):
            for eps in (0.0, 2.0**-20, 0.75 / 256):
                f = k / 256 + eps
                v = torch.tensor([lo + f * spacing, -(lo + f * spacing)])
                expect = math.floor(n * f)  # rbits < expect round up
                if sr_bits == 8:
                    out = round_to_format(
                        v.repeat(n, 1), fmt, "stochastic", torch.arange(n)[:, None].expand(n, 2)
                    )
                    ups = (out.abs() > lo).sum(0).tolist()
                    assert ups == [expect, expect], (fmt.name, k, eps)
                else:
                    r = torch.tensor([[expect - 1] * 2, [expect] * 2]).clamp_min(0)
                    out = round_to_format(v.repeat(2, 1), fmt, "stochastic", r, sr_bits).abs()
                    assert out[1].tolist() == [lo] * 2, (fmt.name, k, eps)  # rbits = threshold: down
                    if expect > 0:
                        assert out[0].tolist() == [lo + spacing] * 2, (fmt.name, k, eps)


def test_eight_bit_stochastic_rounding_is_biased_toward_zero_as_on_blackwell():
    """End to end with Philox bits: f = 2/256 - 2**-16 rounds up with probability 1/256 at 8 bits (as
    cvt.rs), ~2/256 at 24. Each rate lies within 6 binomial sigmas of its own p, and 12 sigmas apart."""
    n = 2**17
    f = 2 / 256 - 2.0**-16
    v = torch.full((n,), 2.0 + f)  # between 2 and 3 in E2M1
    for sr_bits, p in ((8, 1 / 256), (24, f)):
        out = round_to_format(v, E2M1, "stochastic", random_bits(1, n, seed=5, sr_bits=sr_bits), sr_bits)
        assert set(out.unique().tolist()) <= {2.0, 3.0}
        rate = (out == 3.0).double().mean().item()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(rate - p) < 6 * sigma, (sr_bits, rate, p)
    assert f - 1 / 256 > 12 * (f * (1 - f) / n) ** 0.5  # the two hypotheses are told apart


def test_philox_matches_the_reference_vectors():
    """Philox4x32-10 known-answer test (Salmon et al., Random123 kat_vectors: counter 0, key 0). Triton's
    randint4x is this generator with key (seed_lo, seed_hi), counter (c_lo, c_hi, 0, 0)."""
    words = philox4x32(torch.zeros(1, dtype=torch.int64), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_random_bits_are_reproducible_and_laid_out_per_element():
    a = random_bits(5, 40, seed=7)
    assert torch.equal(a, random_bits(5, 40, seed=7)) and not torch.equal(a, random_bits(5, 40, seed=8))
    assert a.shape == (5, 40) and int(a.min()) >= 0 and int(a.max()) < 256
    # Row r starts at index r * 48 (40 rounded up to whole 16-blocks): row 1 = the bits from offset 48.
    flat = random_bits(1, 48 * 5, seed=7)
    assert torch.equal(a[1], flat[0, 48:88])
    with pytest.raises(ValueError, match="sr_bits=16"):
        random_bits(2, 16, seed=1, sr_bits=16)


def test_unknown_rounding_raises():
    with pytest.raises(ValueError, match="nearest, stochastic"):
        round_to_format(torch.ones(3), E2M1, "up")

"""Element and scale formats: E2M1, E4M3, E5M2 (saturating) and E8M0, and rounding onto their grids.

Values are carried in FP32. Rounding is exact: the grid spacing at |v| is a power of two, so v / ulp is
exact and only the final integer rounding decides: nearest-even, or stochastic as Blackwell's
`cvt.rs.satfinite` does it (random bits added to the discarded bits of |v|, the carry decides; see
round_to_format), with the random bits from a seeded Philox4x32-10 that the Triton kernels share.
"""

from dataclasses import dataclass

import torch

from llmtrain.precision.config import ROUNDINGS, SR_BITS

FP32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class FloatFormat:
    name: str
    ebits: int
    mbits: int
    emin: int  # exponent of the smallest normal number (subnormals share its spacing)
    max: float  # largest finite value; conversions saturate to it (TE's satfinite)
    torch_dtype: torch.dtype | None = None  # native torch dtype holding the codes, if any


E2M1 = FloatFormat("e2m1", 2, 1, 0, 6.0)
E4M3 = FloatFormat("e4m3", 4, 3, -6, 448.0, torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, -14, 57344.0, torch.float8_e5m2)
ELEMENTS = {f.name: f for f in (E2M1, E4M3, E5M2)}  # registry.FormatSpec.element -> its grid


# E2M1 code (sign bit 3, magnitude bits 0-2) -> value, as TE's cast_from_fp4x2.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def round_to_format(
    v: torch.Tensor,
    fmt: FloatFormat,
    rounding: str = "nearest",
    rbits: torch.Tensor | None = None,
    sr_bits: int = 8,
) -> torch.Tensor:
    """Round FP32 `v` onto `fmt`'s grid, saturating at +-fmt.max; NaN stays NaN. Returns FP32.

    stochastic: `rbits` holds one integer in [0, 2**sr_bits) per element (see random_bits). With f the
    position of |v| between its two neighbours on the grid (0 <= f < 1), |v| rounds away from zero when
    rbits < floor(2**sr_bits * f), i.e. with probability floor(2**sr_bits * f) / 2**sr_bits: adding
    sr_bits random bits below the kept ones and truncating, as `cvt.rs` does. With 8 bits that is biased
    toward zero by up to 1/256 of a step (1/512 on average); with 24 bits by < 2**-24.
    """
    v = v.float().clamp(-fmt.max, fmt.max)
    if rounding == "nearest" and fmt.torch_dtype is not None:
        # torch's FP8 casts are round-to-nearest-even; the clamp above makes them saturating.
        return v.to(fmt.torch_dtype).float()
    # Grid spacing at |v|: ulp = 2**(max(floor(log2|v|), emin) - mbits), built from the FP32 exponent
    # field (cheaper than frexp/ldexp). v / ulp and q * ulp are exact, so only the integer rounding decides.
    ulp_bits = (v.view(torch.int32) & 0x7F800000).clamp_min_((fmt.emin + 127) << 23).sub_(fmt.mbits << 23)
    t = v * (0x7F000000 - ulp_bits).view(torch.float32)  # 1/ulp: biased exponent 254 - e(ulp)
    if rounding == "nearest":
        q = t.round_()  # half to even
    elif rounding == "stochastic":
        if rbits is None or sr_bits not in SR_BITS:
            raise ValueError(f"stochastic rounding needs rbits and sr_bits in {SR_BITS}, got {sr_bits}")
        a = t.abs()
        q = torch.floor(a)
        threshold = torch.floor((a - q) * float(2**sr_bits))  # the top sr_bits bits of the fraction: exact
        q = torch.copysign(q + (rbits.reshape(q.shape) < threshold), t)
    else:
        raise ValueError(f"rounding={rounding!r}: allowed values are {', '.join(ROUNDINGS)}")
    return q.mul_(ulp_bits.view(torch.float32))


# ---- Random bits for stochastic rounding: Philox4x32-10, exactly as Triton's tl.randint4x ----

_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b (a < 2**32, b int64 holding a uint32) without int64 overflow."""
    p, q = a * (b >> 16), a * (b & 0xFFFF)  # each < 2**48
    return (p + (q >> 16)) >> 16, (((p & 0xFFFF) << 16) + q) & _M32


def philox4x32(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Triton's randint4x(seed, counter) for an int64 `counter` tensor: four uint32 words (in int64)."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def sr_group(sr_bits: int) -> int:
    """Elements served by one Philox call (four 32-bit words): 16 at 8 bits each, 4 at 24 bits."""
    return 16 if sr_bits == 8 else 4


def random_bits(rows: int, cols: int, seed: int, sr_bits: int = 8, device=None) -> torch.Tensor:
    """int64 [rows, cols] of uniform integers in [0, 2**sr_bits) for element (r, c) of the quantized layout.

    Element (r, c) has index e = r * ceil16(cols) + c; Philox counter e // G (G = sr_group(sr_bits)) gives
    four words; 8 bits: byte e % 4 of word (e % 16) // 4; 24 bits: the top 24 bits of word e % 4. The
    Triton kernels draw the very same bits, so both paths round identically for the same seed.
    """
    if sr_bits not in SR_BITS:
        raise ValueError(f"sr_bits={sr_bits}: allowed values are {', '.join(map(str, SR_BITS))}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed}: must be in [0, 2**63)")
    g = sr_group(sr_bits)
    per_row = -(-cols // 16) * 16 // g
    counter = torch.arange(rows * per_row, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32(counter, seed), -1)  # [groups, 4]
    if sr_bits == 8:
        shifts = torch.arange(0, 32, 8, device=device, dtype=torch.int64)
        bits = (words.unsqueeze(-1) >> shifts) & 0xFF  # [groups, word, byte]
    else:
        bits = words >> 8
    return bits.reshape(rows, per_row * g)[:, :cols]


def format_grid(fmt: FloatFormat) -> torch.Tensor:
    """All non-negative finite values of `fmt`, ascending (built from the bit layout, for tests/docs)."""
    vals = set()
    bias = 1 - fmt.emin
    for ef in range(2**fmt.ebits):
        for mf in range(2**fmt.mbits):
            if ef == 0:
                val = mf / 2**fmt.mbits * 2.0**fmt.emin
            else:
                val = (1 + mf / 2**fmt.mbits) * 2.0 ** (ef - bias)
            if val <= fmt.max:
                vals.add(val)
    return torch.tensor(sorted(vals), dtype=torch.float32)


# ---- E2M1 codes (4 bits, two per byte, element 2i in the low nibble as in TE's cast_to_fp4x2) ----


def e2m1_encode(q: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Codes of E2M1 values `q` (already on the grid); `negative` marks strictly negative inputs.

    TE gives the sign bit only to strictly negative inputs, so -0.0 encodes as +0 and -0.1 as -0.
    """
    a = q.abs()
    mag = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4))
    return (mag + negative.float() * 8).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 codes -> [..., n] bytes."""
    return codes[..., ::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def encode_elements(fmt: FloatFormat, elems: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes of grid values `elems` [rows, cols]: FP8 bit patterns, or two E2M1 codes per byte (a NaN
    element, whose block scale is NaN, encodes as 0; `negative` carries the E2M1 sign, see e2m1_encode)."""
    if fmt.torch_dtype is not None:
        return elems.to(fmt.torch_dtype).view(torch.uint8)
    elems = torch.where(torch.isnan(elems), torch.zeros_like(elems), elems)
    return pack_fp4(e2m1_encode(elems, negative))


def decode_elements(fmt: FloatFormat, codes: torch.Tensor) -> torch.Tensor:
    """FP32 grid values of codes made by encode_elements."""
    if fmt.torch_dtype is not None:
        return codes.view(fmt.torch_dtype).float()
    return e2m1_decode(unpack_fp4(codes))


# ---- E8M0 scales (biased power-of-two exponent; 255 = NaN) ----


def e8m0_from_float_ceil(val: torch.Tensor) -> torch.Tensor:
    """TE's float_to_e8m0: the smallest power of two >= val (round toward +inf), saturating at 2**127.

    0 -> code 0 (2**-127). Deviation, for NaN propagation: +-Inf maps to 255 (NaN) where TE's saturating
    conversion gives 254.
    """
    bits = val.float().contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    up = (mant > 0) & (exp != 0xFE) & ~((exp == 0) & (mant <= 0x400000))
    code = exp + up.int()
    code = torch.where(val == 0, torch.zeros_like(code), code)
    code = torch.where(torch.isfinite(val), code, torch.full_like(code, 255))
    return code.to(torch.uint8)


def _pow2_from_biased(e: torch.Tensor) -> torch.Tensor:
    """2**(e - 127) in FP32 for e in [0, 254] from the bit pattern (exact, no FTZ or pow() on any device)."""
    bits = torch.where(e == 0, torch.full_like(e, 0x00400000), e << 23)  # 2**-127 is an FP32 subnormal
    return bits.view(torch.float32)


def e8m0_to_float(code: torch.Tensor) -> torch.Tensor:
    """2**(code - 127) in FP32; code 255 -> NaN."""
    c = code.int()
    return torch.where(c == 255, float("nan"), _pow2_from_biased(c.clamp_max(254)))


def e8m0_reciprocal(code: torch.Tensor) -> torch.Tensor:
    """2**(127 - code) in FP32 (TE's exp2f_rcp); code 255 -> NaN."""
    c = code.int()
    return torch.where(c == 255, float("nan"), _pow2_from_biased(254 - c.clamp_max(254)))

"""Scale selection, as Transformer Engine 2.x computes it, for one 2-D FP32 tensor quantized along its rows.

Every function returns the element values on their format's grid (FP32) plus the scales that decode them.
The arithmetic order and FP32 rounding follow TE's kernels / reference quantizers step by step, because a
different order (e.g. dividing by 6 instead of multiplying by an FP32 1/6) changes scale bits.

Non-finite inputs (our choice, TE saturates or ignores them): a NaN/Inf makes the scale it feeds NaN, so the
tensor (FP8 per-tensor, NVFP4) or the 32-block (MXFP8, MXFP4) dequantizes to NaN and the loss shows it.
"""

import math

import torch
import torch.nn.functional as F

from llmtrain.precision.formats import (
    E2M1,
    E4M3,
    FP32_MAX,
    FloatFormat,
    e8m0_from_float_ceil,
    e8m0_reciprocal,
    round_to_format,
)


def _f32_quotient(a: float, b: float) -> float:
    """fp32(a) / fp32(b) rounded to FP32, held as a Python float (exact, so `tensor * it` computes in FP32
    with the very same constant on every device, no host-to-device copy)."""
    return (torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32)).item()


# FP32 constants exactly as the kernels fold them (FP32 division of FP32 operands).
RCP_448 = _f32_quotient(1.0, 448.0)  # MXFP8 E4M3 max_norm_rcp
RCP_6 = _f32_quotient(1.0, 6.0)  # NVFP4: 1 / E2M1 max
RCP_2688 = _f32_quotient(1.0, 6.0 * 448.0)  # NVFP4 dequantize: 1 / (E2M1 max * E4M3 max)


def pad_to(x: torch.Tensor, row_mult: int, col_mult: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor up to multiples (TE's reference pads partial blocks with zeros)."""
    pr, pc = -x.shape[0] % row_mult, -x.shape[1] % col_mult
    return F.pad(x, (0, pc, 0, pr)) if pr or pc else x


def block_amax(x: torch.Tensor, block: int, block_2d: bool) -> torch.Tensor:
    """|x| max per 1 x block (or block x block) tile: [rows, cols] (cols a multiple of block) -> [rows, cols/block]."""
    rows, cols = x.shape
    if not block_2d:
        return x.view(rows, cols // block, block).abs().amax(-1)
    xp = pad_to(x, block, 1)
    tiles = xp.view(xp.shape[0] // block, block, cols // block, block).abs().amax(dim=(1, 3))
    return tiles.repeat_interleave(block, dim=0)[:rows]


def per_tensor_fp8(x: torch.Tensor, fmt: FloatFormat, rounding: str, rbits=None, sr_bits: int = 8):
    """FP8 current scaling: scale = fmt.max / amax (FP32, IEEE), elements = fmt(x * scale).

    As TE's compute_scale_from_amax: an amax of 0 gives scale 1, a scale that overflows FP32 gives FP32 max.
    Returns (elements, scale_inv [1]).
    """
    amax = x.abs().amax().view(1) if x.numel() else torch.zeros(1, device=x.device)
    scale = torch.div(torch.full_like(amax, fmt.max), amax)  # not `float / tensor`: that is 1/amax * max
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    scale = torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))
    return round_to_format(x * scale, fmt, rounding, rbits, sr_bits), torch.reciprocal(scale)


def e8m0_te(bmax: torch.Tensor, elem: FloatFormat = E4M3) -> torch.Tensor:
    """TE's MXFP8 scale rule (E4M3 elements): E8M0 code of 2**ceil(log2(amax * fp32(1/448))), so no element
    saturates."""
    return e8m0_from_float_ceil(bmax * RCP_448)


def e8m0_ocp(bmax: torch.Tensor, elem: FloatFormat = E2M1) -> torch.Tensor:
    """The OCP MX scale rule (Microscaling spec v1.0, section 6.3): X = 2**(floor(log2(amax)) - emax_elem),
    emax_elem the element type's largest exponent (2 for E2M1, whose max is 1.5 * 2**2), as torchao's
    to_mx computes it in ScaleCalculationMode.FLOOR (torchao/prototype/mx_formats/mx_tensor.py): the FP32
    exponent field of amax minus emax_elem, clamped to E8M0's range. Elements above the element max then
    saturate (amax / X lies in [4, 8), E2M1 stops at 6). amax below 2**-124 (0 included) -> code 0
    (2**-127), applied exactly (torchao divides by 2**-126 there, FP32's smallest normal). Deviation, as
    for our other formats: a NaN or Inf amax gives code 255 (NaN), where torchao maps Inf to a finite scale."""
    emax_elem = math.frexp(elem.max)[1] - 1  # floor(log2(max)): E2M1 2, E4M3 8, E5M2 15
    biased = ((bmax.float().contiguous().view(torch.int32) >> 23) & 0xFF) - emax_elem
    code = biased.clamp(0, 254)
    return torch.where(torch.isfinite(bmax), code, torch.full_like(code, 255)).to(torch.uint8)


def mx(
    x: torch.Tensor,
    elem: FloatFormat,
    scale_rule,
    rounding: str,
    block_2d: bool = False,
    rbits=None,
    sr_bits: int = 8,
    block: int = 32,
    sign: bool = False,
):
    """MX block scaling: per `block` elements (or block x block tile) an E8M0 code `scale_rule(amax, elem)`,
    elements = elem(x * 2**-scale). `x` cols must be a multiple of `block`. Returns (elements [rows, cols],
    E8M0 codes [rows, cols/block], and with `sign` the mask of strictly negative scaled values)."""
    rows, cols = x.shape
    codes = scale_rule(block_amax(x, block, block_2d), elem)
    scaled = x.view(rows, cols // block, block) * e8m0_reciprocal(codes).unsqueeze(-1)
    negative = (scaled < 0).view(rows, cols) if sign else None
    return round_to_format(scaled, elem, rounding, rbits, sr_bits).view(rows, cols), codes, negative


def mxfp8(
    x: torch.Tensor, rounding: str, block_2d: bool = False, rbits=None, sr_bits: int = 8, block: int = 32
):
    """MXFP8: per 32 elements an E8M0 scale 2**ceil(log2(amax * fp32(1/448))), so no element saturates.

    `x` cols must be a multiple of `block`. Returns (elements [rows, cols], E8M0 codes [rows, cols/block]).
    """
    return mx(x, E4M3, e8m0_te, rounding, block_2d, rbits, sr_bits, block)[:2]


def nvfp4_global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """448 * 6 / amax in FP32, FP32 max if that overflows, 1 if amax is 0 (TE's kernel); NaN if amax is not finite."""
    s = torch.clamp_max(torch.div(torch.full_like(amax, 448.0 * 6.0), amax), FP32_MAX)
    s = torch.where((amax == 0) | (s == 0), torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def nvfp4_amax(bmax: torch.Tensor, row_scaled: bool) -> torch.Tensor:
    """The second-level amax from the block amaxes: [1] for the tensor, or [rows, 1] (one per row) for
    TE 2.20's row-scaled NVFP4 (NVFP4QuantizerRef(row_scaled_nvfp4=True), 1x16 blocks only)."""
    if row_scaled:
        return bmax.amax(1, keepdim=True) if bmax.shape[1] else torch.zeros(len(bmax), 1, device=bmax.device)
    return bmax.amax().view(1) if bmax.numel() else torch.zeros(1, device=bmax.device)


def nvfp4(
    x: torch.Tensor,
    rounding: str,
    block_2d: bool = False,
    rbits=None,
    sr_bits: int = 8,
    block: int = 16,
    sign=False,
    row_scaled: bool = False,
):
    """NVFP4: FP32 tensor scale from amax, E4M3 scale per 16 elements (or 16x16 tile), E2M1 elements.

    Follows TE's NVFP4QuantizerRef / quantize_transpose_nvfp4 kernel:
      S_enc = 2688 / amax;  S_dec = 1 / S_enc
      s_blk = E4M3(block_amax * (S_enc * fp32(1/6)))           (saturating, nearest-even)
      elem  = E2M1(x * min(1 / (s_blk * S_dec), FP32 max))      (saturating at 6)
    Returns (elements, block scales as float8_e4m3fn, amax [1], and with `sign` the mask of strictly
    negative scaled values, which carry the E2M1 sign bit). row_scaled: one amax (and S_enc) per row,
    amax [rows, 1]; TE's reference maps an all-zero row's S_enc to FP32 max, we to 1: its block scales
    and codes are 0 either way.
    """
    if row_scaled and block_2d:
        raise ValueError("row-scaled NVFP4 takes 1x16 blocks only (TE's reference), not 16x16 tiles")
    rows, cols = x.shape
    bmax = block_amax(x, block, block_2d)
    amax = nvfp4_amax(bmax, row_scaled)  # = max |x| (per row when row_scaled)
    s_enc = nvfp4_global_encode_scale(amax)
    s_dec = torch.reciprocal(s_enc)
    # Clamping at +-448 also covers TE's min(., FP32 max); NaN passes through.
    s_blk = (bmax * (s_enc * RCP_6)).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    enc = torch.reciprocal(s_blk.float() * s_dec).clamp_max_(FP32_MAX)
    scaled = x.view(rows, cols // block, block) * enc.unsqueeze(-1)
    negative = (scaled < 0).view(rows, cols) if sign else None
    elems = round_to_format(scaled, E2M1, rounding, rbits, sr_bits).view(rows, cols)
    return elems, s_blk, amax, negative


FOUR_OVER_SIX_ERR_MODES = ("MAE", "MSE")


def nvfp4_4over6(
    x: torch.Tensor,
    block_2d: bool = False,
    err_mode: str = "MAE",
    e4m3_max: int = 448,
    block: int = 16,
    sign=False,
    row_scaled: bool = False,
):
    """TE 2.20's NVFP4 "4over6" (NVFP4QuantizerRef(nvfp4_use_4over6=True), default non-fast-math path).

    Each block (1x16 or 16x16) is quantized twice, with its amax mapped to 6 (the usual E4M3 scale) and
    to 4 (the scale times 1.5), and keeps the candidate whose dequantized values are closer to x (sum of
    |error| or of error^2 over the block, in FP32 in TE's order; ties keep map-to-6). The tensor scale
    uses `e4m3_max` (448 or 256: with 256, 1.5x the largest block scale still fits E4M3):
      S_enc = 6 * e4m3_max / amax;  base = (block_amax / 6) * S_enc
      s_blk = E4M3(base * 1.5) or E4M3(base);  elem = E2M1(x * min(1 / (s_blk / S_enc), FP32 max))
    Round to nearest only (TE's reference has no stochastic 4over6). Returns what nvfp4() returns;
    row_scaled: one amax per row as there (the error then uses the row's amax, as TE's reference).
    """
    if err_mode not in FOUR_OVER_SIX_ERR_MODES:
        raise ValueError(f"err_mode={err_mode!r}: allowed values are {', '.join(FOUR_OVER_SIX_ERR_MODES)}")
    if e4m3_max not in (448, 256):
        raise ValueError(f"e4m3_max={e4m3_max}: allowed values are 448, 256")
    if row_scaled and block_2d:
        raise ValueError("row-scaled NVFP4 takes 1x16 blocks only (TE's reference), not 16x16 tiles")
    rows, cols = x.shape
    nb = cols // block
    bmax = block_amax(x, block, block_2d)
    amax = nvfp4_amax(bmax, row_scaled)
    s_enc = torch.clamp_max(torch.div(torch.full_like(amax, 6.0 * e4m3_max), amax), FP32_MAX)
    s_enc = torch.where(s_enc == 0, torch.ones_like(s_enc), s_enc)
    s_dec = torch.div(1.0, s_enc)
    # Divisions by device tensors, as TE's reference: a Python-scalar divisor may become a multiplication
    # by its reciprocal on CUDA, which changes bits.
    base = torch.div(bmax, torch.full_like(amax, 6.0)) * s_enc
    xb = x.view(rows, nb, block)
    denom = torch.full_like(amax, 6.0 * e4m3_max)  # exact in FP32
    cands = []
    for s_blk in ((base * 1.5).clamp(-448.0, 448.0).to(torch.float8_e4m3fn),
                  base.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)):  # fmt: skip
        enc = torch.clamp_max(torch.div(1.0, s_blk.float() * s_dec), FP32_MAX)
        scaled = xb * enc.unsqueeze(-1)
        elems = round_to_format(scaled, E2M1)
        err = torch.zeros_like(bmax)
        sf = s_blk.float()
        for i in range(block):  # TE's order: one element index at a time over all blocks
            diff = elems[:, :, i] * sf * amax / denom - xb[:, :, i]
            err = err + (diff * diff if err_mode == "MSE" else diff.abs())
        cands.append((elems, s_blk, scaled, err))
    (e4, s4, sc4, err4), (e6, s6, sc6, err6) = cands
    if block_2d:  # 16 rows' errors summed in the CUDA warp reduction's tree order
        # A partial last tile: TE's reference pads rows with zeros, whose error is exactly 0.
        t = pad_to(err4, block, 1).view(-1, block, nb), pad_to(err6, block, 1).view(-1, block, nb)
        sums = []
        for r in t:
            r = r[:, 0:8] + r[:, 8:16]
            r = r[:, 0:4] + r[:, 4:8]
            r = r[:, 0:2] + r[:, 2:4]
            sums.append((r[:, 0] + r[:, 1]).repeat_interleave(block, dim=0)[:rows])
        pick4 = sums[0] < sums[1]
    else:
        pick4 = err4 < err6
    elems = torch.where(pick4.unsqueeze(-1), e4, e6).view(rows, cols)
    s_blk = torch.where(pick4, s4.float(), s6.float()).to(torch.float8_e4m3fn)
    negative = (torch.where(pick4.unsqueeze(-1), sc4, sc6) < 0).view(rows, cols) if sign else None
    return elems, s_blk, amax, negative

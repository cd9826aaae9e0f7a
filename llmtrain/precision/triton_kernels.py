"""Fused quantize-dequantize ("fake quantization") kernels in Triton, bit-exact with llmtrain.precision.

One kernel serves every format: per-tensor FP8 (E4M3 / E5M2, current scaling), MXFP8 (E8M0 scale per 32)
and NVFP4 (FP32 tensor scale + E4M3 scale per 16 or per 16x16 tile), round-to-nearest-even or stochastic
rounding (Philox, seeded), and an optional 16-point random Hadamard transform along the quantized axis.
It quantizes a 2-D tensor along either axis in place of memory order: `axis=1` gives the row-wise
operand (blocks along the last dimension), `axis=0` the column-wise one (blocks along the first, e.g. the
token dimension of a wgrad operand), so no transpose is ever materialized.

The output holds the dequantized values in the output dtype. In FP32 they equal
`llmtrain.precision.fake_quantize` bit for bit (tests/gpu/test_triton_kernels.py; on the CPU the same test
runs under TRITON_INTERPRET=1): the scale arithmetic repeats scaling.py's FP32 operations in the same order
(IEEE division via div_rn, never Triton's approximate `/`), and rounding onto a grid is done on the bits.

Per-tensor scales need the tensor's amax first: a small reduction kernel (with the RHT applied when the
quantized values are the transformed ones) writes it, then the quantize kernel reads it.
"""

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from llmtrain.precision import scaling
from llmtrain.precision.formats import SR_BITS as _SR_BITS
from llmtrain.precision.registry import get_format
from llmtrain.precision.triton_launch import launch

# Format ids (constexpr switch inside the kernel) and their grids: (ebits-derived emin, mantissa bits, max).
# The formats the kernels implement; registry.FormatSpec.triton says the same (tests/unit/test_precision_registry.py).
FP8_E4M3, FP8_E5M2, MXFP8, NVFP4 = 0, 1, 2, 3
FORMAT_IDS = {"fp8_e4m3": FP8_E4M3, "fp8_e5m2": FP8_E5M2, "mxfp8": MXFP8, "nvfp4": NVFP4}
BLOCKS = {n: get_format(n).block for n in FORMAT_IDS if get_format(n).blocked}  # elements per block scale
# The reference's FP32 constants (tl.constexpr: the only globals a kernel may read).
FP32_MAX = tl.constexpr(scaling.FP32_MAX)
RCP_448 = tl.constexpr(scaling.RCP_448)
RCP_6 = tl.constexpr(scaling.RCP_6)
RCP_2688 = tl.constexpr(scaling.RCP_2688)


@triton.jit
def _div(a, b):
    """IEEE FP32 division (Triton's `/` is approximate on the GPU)."""
    return tl.math.div_rn(a, b)


@triton.jit
def _round_to_grid(
    v, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr, rbits, STOCHASTIC: tl.constexpr,
    SR_BITS: tl.constexpr = 8,
):  # fmt: skip
    """formats.round_to_format: saturate at +-MAXV, then round v/ulp to an integer (NaN stays NaN)."""
    v = tl.where(v > MAXV, MAXV, tl.where(v < -MAXV, -MAXV, v))
    exp_bits = v.to(tl.int32, bitcast=True) & 0x7F800000
    ulp_bits = tl.maximum(exp_bits, (EMIN + 127) << 23) - (MBITS << 23)
    t = v * (0x7F000000 - ulp_bits).to(tl.float32, bitcast=True)  # v / ulp, exact
    if STOCHASTIC:  # |t| rounds away from zero iff rbits < floor(2**SR_BITS * frac|t|) (as cvt.rs)
        a = tl.abs(t)
        q = tl.floor(a)
        threshold = tl.floor((a - q) * (2.0**SR_BITS))
        q = q + tl.where(rbits.to(tl.float32) < threshold, 1.0, 0.0)
        sign = t.to(tl.int32, bitcast=True) & -2147483648
        q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # copysign(q, t)
    else:
        q = (t + 12582912.0) - 12582912.0  # + 1.5 * 2**23: round half to even for |t| < 2**22
    return q * ulp_bits.to(tl.float32, bitcast=True)


@triton.jit
def _random_bits(seed, rows, col0, C, BR: tl.constexpr, BC: tl.constexpr, SR_BITS: tl.constexpr):
    """formats.random_bits for the [BR, BC] tile at (rows, col0) of the quantized layout: element (r, c)
    has index r * ceil16(C) + c, one Philox call (four words) per G = 16 (8-bit) or 4 (24-bit) indices."""
    G: tl.constexpr = 16 if SR_BITS == 8 else 4
    NG: tl.constexpr = BC // G
    per_row = (C + 15) // 16 * (16 // G)
    group = col0 // G + tl.arange(0, NG)
    counter = rows[:, None].to(tl.int64) * per_row + group[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BR, NG, 4))  # [..., w] = word w
    if SR_BITS == 8:
        shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
        bits = (words[:, :, :, None] >> shifts[None, None, None, :]) & 0xFF  # [..., word, byte]
    else:
        bits = words >> 8
    return tl.reshape(bits, (BR, BC)).to(tl.int32)


@triton.jit
def _pow2(e):
    """2**(e - 127) for biased exponents e in [0, 254] (FP32 bits; 2**-127 is a subnormal)."""
    return tl.where(e == 0, 0x00400000, e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_ceil(val):
    """formats.e8m0_from_float_ceil: smallest power of two >= val as a biased exponent; 255 = NaN."""
    bits = val.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    up = (mant > 0) & (exp != 0xFE) & ~((exp == 0) & (mant <= 0x400000))
    code = exp + up.to(tl.int32)
    code = tl.where(val == 0, 0, code)
    finite = (val == val) & (tl.abs(val) < float("inf"))
    return tl.where(finite, code, 255)


@triton.jit
def _round_to_bf16(y):
    """y rounded to the nearest BF16 (ties to even), still in FP32; the cast to BF16 is then exact."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(y == y, bits.to(tl.float32, bitcast=True), y)


@triton.jit
def _fwht16(x):
    """x @ H16 (Sylvester) along the last axis of a [N, 16] tensor, butterfly by butterfly."""
    n: tl.constexpr = x.shape[0]
    y = tl.reshape(x, (n, 1, 2, 8))
    a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    y = tl.reshape(y, (n, 2, 2, 4))
    a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    y = tl.reshape(y, (n, 4, 2, 2))
    a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    y = tl.reshape(y, (n, 8, 2, 1))
    a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(y, (n, 16))


@triton.jit
def _as_bf16(y, NATIVE: tl.constexpr):
    """y rounded to BF16 (RNE; NaN stays NaN), as a BF16 tensor. NATIVE: the GPU's cvt.rn (one instruction
    per two values); otherwise on the bits, the same in the interpreter, whose NumPy cast is no RNE."""
    if NATIVE:
        return y.to(tl.bfloat16)
    return _round_to_bf16(y).to(tl.bfloat16)


@triton.jit
def _rht16(x, signs_ptr, x_ptr, NATIVE: tl.constexpr):
    """hadamard.hadamard along the last axis of the FP32 tile x (its length a multiple of 16): the exact
    FP64 sum of the (+-x/4) terms, rounded to FP32, then to x_ptr's element type (as TE rounds its RHT
    output to the input dtype before the amax and the quantization)."""
    n: tl.constexpr = x.shape[0]
    m: tl.constexpr = x.shape[1]
    signs = tl.load(signs_ptr + tl.arange(0, 16)).to(tl.float64)
    xb = tl.reshape(x.to(tl.float64), (n * m // 16, 16)) * signs[None, :]
    y = tl.reshape((_fwht16(xb) * 0.25).to(tl.float32), (n, m))
    if x_ptr.dtype.element_ty == tl.bfloat16:
        y = _as_bf16(y, NATIVE).to(tl.float32)
    elif x_ptr.dtype.element_ty == tl.float16:
        y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _load_tile(x_ptr, signs_ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr,
               RHT: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    """The [BR, BC] tile of program (pid 0, pid 1) in FP32, zero-padded, RHT'd along C when asked."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RHT:
        x = _rht16(x, signs_ptr, x_ptr, NATIVE)
    return x, offs, mask, rows, cols


# do_not_specialize: arguments whose value classes (multiple of 16, equal to 1) would only multiply the
# compiled variants: the row count (it masks whole rows) and the seeds. C and the row stride keep theirs
# (they decide the vector loads).
@triton.jit(do_not_specialize=["R"])
def _amax_kernel(x_ptr, signs_ptr, amax_ptr, R, C, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr,
                 RHT: tl.constexpr, NATIVE: tl.constexpr):  # fmt: skip
    """amax_ptr[0] = max |x| over the tensor (after the RHT when RHT); NaN counts as +inf."""
    x, _, _, _, _ = _load_tile(x_ptr, signs_ptr, R, C, stride_r, stride_c, BR, BC, RHT, NATIVE)
    tl.atomic_max(amax_ptr, _nan_inf(x))


@triton.jit
def _block_amax(a, BR: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_2D: tl.constexpr):
    """|x| max per 1 x BLOCK (or BLOCK x BLOCK) block, as a [BR, BC // BLOCK, 1] tensor; NaN -> NaN."""
    nan = tl.where(a == a, 0.0, 1.0)
    if BLOCK_2D:  # per row first (as 1 x BLOCK blocks), then over each BLOCK rows
        NB: tl.constexpr = BC // BLOCK
        m = tl.max(tl.reshape(a, (BR, NB, BLOCK)), axis=2)
        has_nan = tl.max(tl.reshape(nan, (BR, NB, BLOCK)), axis=2)
        m = tl.max(tl.reshape(m, (BR // BLOCK, BLOCK, NB)), axis=1)
        has_nan = tl.max(tl.reshape(has_nan, (BR // BLOCK, BLOCK, NB)), axis=1)
        m = tl.where(has_nan > 0, float("nan"), m)
        m = tl.broadcast_to(m[:, None, :], (BR // BLOCK, BLOCK, NB))
        return tl.reshape(m, (BR, NB, 1))
    t = tl.reshape(a, (BR, BC // BLOCK, BLOCK))
    m = tl.max(t, axis=2, keep_dims=True)
    has_nan = tl.max(tl.reshape(nan, (BR, BC // BLOCK, BLOCK)), axis=2, keep_dims=True)
    return tl.where(has_nan > 0, float("nan"), m)


@triton.jit
def _nan_inf(a):
    """|x| for an amax: NaN counts as +inf (so a NaN anywhere makes the tensor scale NaN)."""
    a = tl.abs(a)
    a = tl.where(a == a, a, float("inf"))
    # per 16 along the last axis first, as the quantize kernels' block amaxes: the RHT's butterflies then
    # get the layout they have there (in registers, far fewer shuffles)
    b = tl.max(tl.reshape(a, (a.shape[0], a.shape[1] // 16, 16)), axis=2)
    return tl.max(tl.max(b, axis=1), axis=0)


@triton.jit
def _quantize_tile(
    x, rows, col0, C, amax_ptr, seed,
    FMT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_2D: tl.constexpr, STOCHASTIC: tl.constexpr,
    SR_BITS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Quantize-dequantize the FP32 tile x [BR, BC] (rows `rows`, columns col0.. of the quantized layout,
    whose length is C) along its last axis; the tensor amax (FP8, NVFP4) is read from amax_ptr."""
    u = tl.zeros((BR, BC), dtype=tl.int32)
    if STOCHASTIC:
        u = _random_bits(seed, rows, col0, C, BR, BC, SR_BITS)
    if FMT == 0 or FMT == 1:  # per-tensor current scaling (scaling.per_tensor_fp8)
        MAXV: tl.constexpr = 448.0 if FMT == 0 else 57344.0
        amax = tl.load(amax_ptr)
        scale = _div(MAXV, amax)
        scale = tl.where(scale == float("inf"), FP32_MAX, scale)
        scale = tl.where(amax == 0, 1.0, scale)
        scale = tl.where(amax < float("inf"), scale, float("nan"))
        if FMT == 0:
            elems = _round_to_grid(x * scale, -6, 3, 448.0, u, STOCHASTIC, SR_BITS)
        else:
            elems = _round_to_grid(x * scale, -14, 2, 57344.0, u, STOCHASTIC, SR_BITS)
        y = elems * _div(1.0, scale)
    else:
        NB: tl.constexpr = BC // BLOCK
        bmax = _block_amax(tl.abs(x), BR, BC, BLOCK, BLOCK_2D)  # [BR, NB, 1]
        xb = tl.reshape(x, (BR, NB, BLOCK))
        ub = tl.reshape(u, (BR, NB, BLOCK))
        if FMT == 2:  # MXFP8 (scaling.mxfp8)
            code = _e8m0_ceil(bmax * RCP_448)
            recip = tl.where(code == 255, float("nan"), _pow2(254 - tl.minimum(code, 254)))
            elems = _round_to_grid(xb * recip, -6, 3, 448.0, ub, STOCHASTIC, SR_BITS)
            dec = tl.where(code == 255, float("nan"), _pow2(tl.minimum(code, 254)))
            y = tl.reshape(elems * dec, (BR, BC))
        else:  # NVFP4 (scaling.nvfp4 + quantize._dequantize_elems)
            amax = tl.load(amax_ptr)
            s_enc = tl.minimum(_div(2688.0, amax), FP32_MAX)
            s_enc = tl.where((amax == 0) | (s_enc == 0), 1.0, s_enc)
            s_enc = tl.where(amax < float("inf"), s_enc, float("nan"))
            s_dec = _div(1.0, s_enc)
            s_blk = _round_to_grid(bmax * (s_enc * RCP_6), -6, 3, 448.0, bmax, False)
            enc = tl.minimum(_div(1.0, s_blk * s_dec), FP32_MAX)
            elems = _round_to_grid(xb * enc, 0, 1, 6.0, ub, STOCHASTIC, SR_BITS)
            s_amax = s_blk * amax
            final = tl.where(tl.abs(s_amax) == float("inf"), s_blk * (amax * RCP_2688), s_amax * RCP_2688)
            y = tl.reshape(elems * final, (BR, BC))
    return y


@triton.jit
def _store(out_ptr, offs, y, mask, NATIVE: tl.constexpr):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + offs, _as_bf16(y, NATIVE), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R", "seed"])
def _fake_quant_kernel(
    x_ptr, out_ptr, signs_ptr, amax_ptr, R, C, stride_r, stride_c, seed,
    FMT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_2D: tl.constexpr, RHT: tl.constexpr,
    STOCHASTIC: tl.constexpr, SR_BITS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    NATIVE: tl.constexpr = False,
):  # fmt: skip
    x, offs, mask, rows, _ = _load_tile(x_ptr, signs_ptr, R, C, stride_r, stride_c, BR, BC, RHT, NATIVE)
    y = _quantize_tile(x, rows, tl.program_id(1) * BC, C, amax_ptr, seed,
                       FMT, BLOCK, BLOCK_2D, STOCHASTIC, SR_BITS, BR, BC)  # fmt: skip
    _store(out_ptr, offs, y, mask, NATIVE)


# ---- Both layouts of one tensor from one read: a [TM, TN] tile in memory order, transposed in registers
# for the column-wise operand (blocks along dim 0). Each layout has its own format, rounding, tiles, RHT.


@triton.jit
def _warp_rows(TM: tl.constexpr, T: tl.constexpr, W: tl.constexpr):
    """The tile's rows in load order: the [TM, TN] load is laid out with T lanes and W warps along its rows
    and K = TM // (T * W) registers, so position i = (k * W + w) * T + t; it holds row (w * K + k) * T + t,
    which gives each warp TM // W consecutive rows, whole column-wise blocks that it reduces with
    register ops and shuffles instead of through shared memory. (Any T and W give the same values: the
    two functions below undo the order exactly; only the speed depends on matching the layout.)"""
    K: tl.constexpr = TM // (T * W)
    i = tl.arange(0, TM)
    return ((i // T % W) * K + i // (T * W)) * T + i % T


@triton.jit
def _in_row_order(x, TM: tl.constexpr, TN: tl.constexpr, T: tl.constexpr, W: tl.constexpr):
    """x [TM, TN] in load order (_warp_rows) -> in row order (a relabelling of registers, no data moves)."""
    K: tl.constexpr = TM // (T * W)
    return tl.reshape(tl.permute(tl.reshape(x, (K, W, T, TN)), (1, 0, 2, 3)), (TM, TN))


@triton.jit
def _in_load_order(y, TM: tl.constexpr, TN: tl.constexpr, T: tl.constexpr, W: tl.constexpr):
    """The inverse of _in_row_order."""
    K: tl.constexpr = TM // (T * W)
    return tl.reshape(tl.permute(tl.reshape(y, (W, K, T, TN)), (1, 0, 2, 3)), (TM, TN))


@triton.jit
def _load_pair_tile(x_ptr, R, C, stride_r, stride_c, TM: tl.constexpr, TN: tl.constexpr, T: tl.constexpr,
                    W: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """The [TM, TN] tile of program (pid 0, pid 1) in FP32, zero-padded, its rows in load order. VEC: the
    elements per vector load (a smaller one than 16 bytes leaves a thread more rows of fewer columns)."""
    rows = tl.program_id(0) * TM + _warp_rows(TM, T, W)
    cols = tl.max_contiguous(tl.program_id(1) * TN + tl.arange(0, TN), VEC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x, offs, mask, rows, cols


@triton.jit(do_not_specialize=["R"])
def _amax_pair_kernel(
    x_ptr, signs_ptr, amax_ptr, R, C, stride_r, stride_c,
    ROW: tl.constexpr, ROW_RHT: tl.constexpr, COL: tl.constexpr, COL_RHT: tl.constexpr,
    TM: tl.constexpr, TN: tl.constexpr, T: tl.constexpr, W: tl.constexpr, VEC: tl.constexpr,
    NATIVE: tl.constexpr = False,
):  # fmt: skip
    """amax_ptr[0] / [1] = max |x| of the row-wise / column-wise operand (after its RHT)."""
    x, _, _, _, _ = _load_pair_tile(x_ptr, R, C, stride_r, stride_c, TM, TN, T, W, VEC)
    if ROW:
        xr = x  # the row order does not matter here
        if ROW_RHT:
            xr = _rht16(xr, signs_ptr, x_ptr, NATIVE)
        tl.atomic_max(amax_ptr, _nan_inf(xr))
    if COL:
        xc = tl.trans(_in_row_order(x, TM, TN, T, W))
        if COL_RHT:
            xc = _rht16(xc, signs_ptr, x_ptr, NATIVE)
        tl.atomic_max(amax_ptr + 1, _nan_inf(xc))


@triton.jit(do_not_specialize=["R", "seed_row", "seed_col"])
def _fake_quant_pair_kernel(
    x_ptr, row_ptr, col_ptr, signs_ptr, amax_ptr, R, C, stride_r, stride_c, seed_row, seed_col,
    ROW_FMT: tl.constexpr, ROW_BLOCK: tl.constexpr, ROW_2D: tl.constexpr, ROW_RHT: tl.constexpr,
    ROW_SR: tl.constexpr,
    COL_FMT: tl.constexpr, COL_BLOCK: tl.constexpr, COL_2D: tl.constexpr, COL_RHT: tl.constexpr,
    COL_SR: tl.constexpr,
    SR_BITS: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr, T: tl.constexpr, W: tl.constexpr,
    VEC: tl.constexpr, COL_SAME: tl.constexpr = False, NATIVE: tl.constexpr = False,
):  # fmt: skip
    """COL_SAME: the column-wise output equals the row-wise one (see _axis_free) and is stored from it."""
    x, offs, mask, rows, cols = _load_pair_tile(x_ptr, R, C, stride_r, stride_c, TM, TN, T, W, VEC)
    row0 = tl.program_id(0) * TM
    if ROW_FMT >= 0:
        xr = x
        if ROW_RHT:
            xr = _rht16(xr, signs_ptr, x_ptr, NATIVE)
        tile_rows = rows
        if ROW_2D:  # 2-D blocks need whole blocks of rows: in row order (else the load order will do)
            xr = _in_row_order(xr, TM, TN, T, W)
            tile_rows = row0 + tl.arange(0, TM)
        y = _quantize_tile(
            xr,
            tile_rows,
            tl.program_id(1) * TN,
            C,
            amax_ptr,
            seed_row,
            ROW_FMT,
            ROW_BLOCK,
            ROW_2D,
            ROW_SR,
            SR_BITS,
            TM,
            TN,
        )
        if ROW_2D:
            y = _in_load_order(y, TM, TN, T, W)
        _store(row_ptr, offs, y, mask, NATIVE)
        if COL_SAME:
            _store(col_ptr, offs, y, mask, NATIVE)
    if COL_FMT >= 0:
        xc = tl.trans(
            _in_row_order(x, TM, TN, T, W)
        )  # [TN, TM]: the column-wise operand's rows are x's columns
        if COL_RHT:
            xc = _rht16(xc, signs_ptr, x_ptr, NATIVE)
        yc = _quantize_tile(
            xc, cols, row0, R, amax_ptr + 1, seed_col, COL_FMT, COL_BLOCK, COL_2D, COL_SR, SR_BITS, TN, TM
        )
        _store(col_ptr, offs, _in_load_order(tl.trans(yc), TM, TN, T, W), mask, NATIVE)


@dataclass(frozen=True)
class Direction:
    """One layout of a tensor for fake_quantize_2d_pair: fake_quantize_2d's arguments for one axis."""

    fmt: str
    rounding: str = "nearest"
    block_2d: bool = False
    rht: bool = False  # transform along the quantized axis first (needs rht_signs)
    seed: int = 0  # Philox seed of stochastic rounding


def _axis_free(d: Direction) -> bool:
    """Whether quantizing along axis 0 gives the very values of axis 1: with round-to-nearest and no RHT,
    per-tensor FP8 is elementwise and a square 2-D block (16x16, 32x32) is the same block of W and W^T.
    (Stochastic rounding draws its bits by position in the quantized layout, the RHT mixes along its
    axis: those are not.) The column-wise result is then computed by the row-wise, transpose-free path."""
    return d.rounding == "nearest" and not d.rht and (d.block_2d or d.fmt not in BLOCKS)


def one_quantization_serves_both(row: Direction, col: Direction) -> bool:
    """Whether the column-wise result of `col` is, value for value, the row-wise result of `row` (an axis-free
    column-wise direction asking what the row-wise one does, seeds aside): e.g. NVFP4 16x16 weights."""
    return _axis_free(col) and replace(row, seed=0) == replace(col, seed=0)


def _check(x: torch.Tensor, d: Direction, sr_bits: int, rht_signs) -> None:
    if x.ndim != 2:
        raise ValueError(f"fake_quantize_2d takes a 2-D tensor, got shape {tuple(x.shape)}")
    if d.fmt not in FORMAT_IDS:
        raise ValueError(f"fmt={d.fmt!r}: allowed values are {', '.join(FORMAT_IDS)}")
    if d.rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={d.rounding!r}: allowed values are nearest, stochastic")
    if sr_bits not in _SR_BITS:
        raise ValueError(f"sr_bits={sr_bits}: allowed values are {', '.join(map(str, _SR_BITS))}")
    if not 0 <= d.seed < 2**63:
        raise ValueError(f"seed={d.seed}: must be in [0, 2**63)")
    if d.rht and rht_signs is None:
        raise ValueError("rht=True needs rht_signs (16 signs of the Hadamard transform)")


@functools.cache
def _unread(device: torch.device) -> torch.Tensor:
    """A pointer argument this launch's constexprs leave unread (the signs without RHT, MXFP8's amax): one
    buffer per device instead of an allocation per call, whose host time counts at 1B, where the emulated
    step is host-bound (cProfile on an H100 host: 14-22 us a torch.zeros; scripts/host_cost.py)."""
    return torch.zeros(16, device=device, dtype=torch.float32)


def _signs(x: torch.Tensor, rht_signs: torch.Tensor | None) -> torch.Tensor:
    if rht_signs is None:
        return _unread(x.device)
    return rht_signs.to(device=x.device, dtype=torch.float32).contiguous()


def _new_out(x: torch.Tensor, out_dtype) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=out_dtype or x.dtype, device=x.device)


def _row_tile(block: int, block_2d: bool) -> tuple[int, int]:
    """(BR, BC) of the row-wise kernel: BC (quantized, contiguous axis) spans whole blocks."""
    return (block if block_2d else 16), 256


def launch_route(d: Direction, axis: int) -> str:
    """Which kernel fake_quantize_2d launches (scripts/kernel_sass.py asks the same): "pair_col", the pair
    kernel's column-wise path (axis 0, unless the result is the axis-1 one: _axis_free); "pair_row", its
    row-wise path, for 2-D blocks: its tiles keep a 16x16 block in one warp (no shared-memory reduction)
    and give a thread 64 elements (H100: NVFP4 16x16 row 115 -> 90 us on 8192x4096); else "row", the row
    kernel. Stochastic rounding stays on the row kernel: on the pair kernel it took fewer SASS instructions
    per element (45 -> 39) but 187 registers a thread, and ran slower (H100, 8192x4096: 106 us on the row
    kernel on 2026-12-06, 147 us on the pair kernel on 2026-12-07)."""
    if axis == 0 and not _axis_free(d):
        return "pair_col"
    if d.block_2d and d.fmt in BLOCKS:
        return "pair_row"
    return "row"


def fake_quantize_2d(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int = 1,
    rounding: str = "nearest",
    block_2d: bool = False,
    rht_signs: torch.Tensor | None = None,
    seed: int = 0,
    sr_bits: int = 8,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize a 2-D tensor with blocks along `axis` (1: rows' last dim, 0: columns).

    Equals `fake_quantize(x, fmt, ...)` (axis=1) or `fake_quantize(x.t(), ...).t()` (axis=0), with
    `hadamard(., 16, rht_signs)` applied along the quantized axis first when rht_signs is given (the
    values are then those of the transformed tensor). Stochastic rounding uses `sr_bits` random bits per
    element from Philox(seed), the same bits as `fake_quantize(..., seed=seed, sr_bits=sr_bits)`.
    `out`, if given, must be strided like x. axis=0 runs the pair kernel (fake_quantize_2d_pair), whose
    tiles are read in memory order and transposed in registers, unless the result is the axis=1 one
    (round-to-nearest without RHT, per-tensor FP8 or 2-D blocks: see _axis_free); so do 2-D blocks along
    axis 1.
    """
    if axis not in (0, 1):
        raise ValueError(f"axis={axis}: allowed values are 0, 1")
    d = Direction(fmt, rounding, bool(block_2d), rht_signs is not None, int(seed))
    _check(x, d, sr_bits, rht_signs)
    if out is None:
        out = _new_out(x, out_dtype)
    route = launch_route(d, axis)
    if route == "pair_col":
        return _launch_pair(x, None, d, rht_signs, sr_bits, None, out)[1]
    if route == "pair_row":
        return _launch_pair(x, d, None, rht_signs, sr_bits, out, None)[0]
    if x.numel() == 0:
        return out
    block = BLOCKS.get(fmt, 16)
    block_2d = bool(block_2d) and fmt in BLOCKS
    R, C = x.shape
    stride_r, stride_c = x.stride()
    rht = rht_signs is not None
    signs = _signs(x, rht_signs)
    br, bc = _row_tile(block, block_2d)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    if fmt == "mxfp8":  # no tensor scale
        amax = _unread(x.device)
    else:
        amax = torch.zeros(1, device=x.device, dtype=torch.float32)
        launch(_amax_kernel, grid, (x, signs, amax, R, C, stride_r, stride_c),
               dict(BR=br, BC=bc, RHT=rht, NATIVE=x.is_cuda))  # fmt: skip
    launch(
        _fake_quant_kernel, grid, (x, out, signs, amax, R, C, stride_r, stride_c, seed),
        dict(FMT=FORMAT_IDS[fmt], BLOCK=block, BLOCK_2D=block_2d, RHT=rht,
             STOCHASTIC=rounding == "stochastic", SR_BITS=sr_bits, BR=br, BC=bc, NATIVE=x.is_cuda),
    )  # fmt: skip
    return out


# Tiles of the pair kernels, ([TM, TN], warps, elements per vector load), by what the column-wise
# direction needs: whole 16- and 32-blocks (and 2-D tiles) along both axes, and each column-wise block in
# one warp (_warp_rows). The RHT's 16 rows of a column sit in one thread's registers (4-element loads:
# all 32 lanes along the 128 columns), so its butterflies need no shuffles; without the RHT, 8-element
# loads and two lanes per block. Chosen by the SASS instructions per element of the sm_90 build
# (scripts/kernel_sass.py), which track the kernels' H100 times.
PAIR_TILES = {"rht": ((32, 128), 2, 4), "mxfp8": ((128, 64), 4, 8), "other": ((32, 128), 2, 8)}


def _pair_layout(x: torch.Tensor, col: "Direction | None") -> dict:
    """The pair kernels' tile constants; T: the lanes along the rows in the [TM, TN] load's blocked layout
    (VEC-element vectors along TN, the rest of the warp's 32 lanes along TM), so that _warp_rows matches
    it."""
    kind = "other" if col is None else "rht" if col.rht else "mxfp8" if col.fmt == "mxfp8" else "other"
    (tm, tn), warps, vec = PAIR_TILES[kind]
    vec = min(vec, max(1, 16 // x.element_size()))
    lanes_c = min(32, tn // vec)
    return dict(TM=tm, TN=tn, T=32 // lanes_c, W=warps, VEC=vec, num_warps=warps)


def _launch_pair(x, row: Direction | None, col: Direction | None, rht_signs, sr_bits, row_out, col_out):
    if x.numel() == 0:
        return row_out, col_out
    result = row_out, col_out
    col_same = False
    if col is not None and _axis_free(col):
        if row is None:  # the row-wise path writes the column-wise output
            row, row_out, col = col, col_out, None
        elif one_quantization_serves_both(row, col):  # one quantization, stored twice
            col_same, col = True, None
    R, C = x.shape
    signs = _signs(x, rht_signs)
    tile = _pair_layout(x, col)
    grid = (triton.cdiv(R, tile["TM"]), triton.cdiv(C, tile["TN"]))
    need_row = row is not None and row.fmt != "mxfp8"
    need_col = col is not None and col.fmt != "mxfp8"
    amax = _unread(x.device)
    if need_row or need_col:
        amax = torch.zeros(2, device=x.device, dtype=torch.float32)
        launch(
            _amax_pair_kernel, grid, (x, signs, amax, R, C, x.stride(0), x.stride(1)),
            dict(ROW=need_row, ROW_RHT=need_row and row.rht, COL=need_col, COL_RHT=need_col and col.rht,
                 NATIVE=x.is_cuda, **tile),
        )  # fmt: skip

    def consts(d: Direction | None):
        if d is None:
            return -1, 16, False, False, False, 0
        blocked = d.fmt in BLOCKS
        return (FORMAT_IDS[d.fmt], BLOCKS.get(d.fmt, 16), d.block_2d and blocked, d.rht,
                d.rounding == "stochastic", d.seed)  # fmt: skip

    rf, rb, r2, rr, rs, r_seed = consts(row)
    cf, cb, c2, cr, cs, c_seed = consts(col)
    dummy = row_out if row_out is not None else col_out
    launch(
        _fake_quant_pair_kernel, grid,
        (x, row_out if row_out is not None else dummy, col_out if col_out is not None else dummy, signs, amax,
         R, C, x.stride(0), x.stride(1), r_seed, c_seed),
        dict(ROW_FMT=rf, ROW_BLOCK=rb, ROW_2D=r2, ROW_RHT=rr, ROW_SR=rs,
             COL_FMT=cf, COL_BLOCK=cb, COL_2D=c2, COL_RHT=cr, COL_SR=cs,
             SR_BITS=sr_bits, COL_SAME=col_same, NATIVE=x.is_cuda, **tile),
    )  # fmt: skip
    return result


def fake_quantize_2d_pair(
    x: torch.Tensor,
    row: Direction | None,
    col: Direction | None,
    *,
    rht_signs: torch.Tensor | None = None,
    sr_bits: int = 8,
    out_dtype: torch.dtype | None = None,
    row_out: torch.Tensor | None = None,
    col_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both quantizations a GEMM pair needs of one 2-D tensor, from one read of it.

    Returns (row-wise, column-wise) fake-quantized tensors, each shaped and strided like x (None where its
    Direction is None), equal bit for bit to
        fake_quantize_2d(x, row.fmt, axis=1, rounding=row.rounding, block_2d=row.block_2d,
                         rht_signs=rht_signs if row.rht else None, seed=row.seed, sr_bits=sr_bits)
    and the same with axis=0 for `col`. One pass computes the tensor amaxes of both layouts (after their
    RHT), a second reads each [128, 32] tile once, quantizes it row-wise and, transposed in registers,
    column-wise, RHT and stochastic rounding fused, and writes both outputs (instead of two passes each).
    `row_out` / `col_out`, if given, receive the results (strided like x; TE's cached weight buffers).
    """
    for d, given in ((row, row_out), (col, col_out)):
        if d is not None:
            _check(x, d, sr_bits, rht_signs)
        if given is not None and (d is None or given.shape != x.shape or given.stride() != x.stride()):
            raise ValueError("row_out/col_out: one per given Direction, shaped and strided like x")
    if row is not None and row_out is None:
        row_out = _new_out(x, out_dtype)
    if col is not None and col_out is None:
        col_out = _new_out(x, out_dtype)
    if row is None and col is None:
        return None, None
    return _launch_pair(x, row, col, rht_signs, sr_bits, row_out, col_out)

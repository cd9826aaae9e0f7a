"""Public quantizers: quantize -> codes + scales, dequantize, and fake_quantize (= dequantize(quantize(x))).

Tensors are quantized along their last dimension (the GEMM reduction dimension); leading dimensions are
flattened into rows. A last dimension that is not a multiple of the block is zero-padded like TE's
reference quantizers (zeros never change an amax); codes and block scales keep the padded width, dequantize
drops it.

NaN/Inf: propagated, never raised (a raise would need a device sync on every GEMM). A non-finite element
makes the scale it shares NaN: the whole tensor for fp8_e4m3/fp8_e5m2/nvfp4 (the tensor scale comes from the
amax), its 32-block for mxfp8/mxfp4. Dequantized, those elements are NaN, so the loss turns NaN and the training
loop's NaN policy skips the step. (TE instead saturates Inf and ignores NaN when taking the amax.)
"""

from dataclasses import dataclass

import torch

from llmtrain.precision import scaling
from llmtrain.precision.formats import (
    ELEMENTS,
    ROUNDINGS,
    SR_BITS,
    decode_elements,
    e8m0_to_float,
    encode_elements,
    random_bits,
)
from llmtrain.precision.nvfp4_options import FourOverSix
from llmtrain.precision.registry import FORMATS as _REGISTRY
from llmtrain.precision.registry import FormatSpec, get_format

FORMATS = tuple(_REGISTRY)  # the registered formats (registry.py), in registration order


@dataclass
class QuantizedTensor:
    """Codes and scales of one quantized tensor.

    codes: uint8 [rows, padded cols] (FP8 bit patterns), or [rows, padded cols / 2] for E2M1 elements
        (nvfp4, mxfp4: two codes per byte, even element in the low nibble, as TE packs them).
    scale: fp8_*: FP32 [1] dequantization scale (1 / quantization scale); mxfp8, mxfp4: uint8 E8M0 codes
        [rows, blocks]; nvfp4: float8_e4m3fn block scales [rows, blocks] (2-D tiles repeat per row).
    amax: nvfp4 only: FP32 [1] tensor amax, or [rows] row amaxes when row-scaled (TE's global_amax_row);
        the second-level decode scale is amax / (6 * e4m3_max).
    e4m3_max: nvfp4: 448, or 256 for 4over6 with that range (FourOverSix).
    """

    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_2d: bool = False
    e4m3_max: int = 448


@dataclass
class Parts:
    """What a GEMM consumes: `values` (element x block scale, exact in BF16) and a per-tensor `factor`.

    A quantized GEMM is (values_a @ values_b^T) * factor_a * factor_b, with the per-tensor factors
    applied to the FP32 output as tensor cores do (`factor` None = 1): FP8 scale_inv, NVFP4 amax / 2688
    ([1], or [rows, 1] for row-scaled NVFP4: it then scales the output's rows, as TE's row-scaled GEMM).
    """

    values: torch.Tensor
    factor: torch.Tensor | None


def check_args(fmt: str, rounding: str, sr_bits: int = 8) -> None:
    get_format(fmt)  # ValueError naming the registered formats
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: allowed values are {', '.join(ROUNDINGS)}")
    if sr_bits not in SR_BITS:
        raise ValueError(f"sr_bits={sr_bits}: allowed values are {', '.join(map(str, SR_BITS))}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got {x.dtype}")
    return x.reshape(1, 1) if x.ndim == 0 else x.reshape(-1, x.shape[-1])


def _sr_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The Philox seed of one stochastic quantization: `seed`, else one draw from `generator` (or torch's
    default generator), so that successive calls with one generator get different bits."""
    if seed is not None:
        return int(seed)
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


@dataclass
class _Raw:
    """A scale rule's output on the padded FP32 tensor: grid `elems` [rows, padded cols], the `scale`
    (FP32 [1] scale_inv, E8M0 codes or E4M3 block scales), NVFP4's `amax`, and the mask of strictly negative
    scaled values for the E2M1 sign bit."""

    elems: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor | None = None
    negative: torch.Tensor | None = None


class _PerTensor:
    """fp32_tensor: FP8 current scaling (scaling.per_tensor_fp8), elementwise, no padding."""

    nvfp4_options = False
    padded = False

    def quantize(self, spec, xf, rounding, block_2d, rbits, sr_bits, sign, fos, row_scaled) -> _Raw:
        return _Raw(*scaling.per_tensor_fp8(xf, ELEMENTS[spec.element], rounding, rbits, sr_bits))

    def dequantize(self, elems, scale, amax, rcp) -> torch.Tensor:
        return elems * scale

    def parts(self, raw: _Raw, rcp) -> Parts:
        return Parts(raw.elems, raw.scale)


class _MX:
    """e8m0_te / e8m0_ocp: an E8M0 power-of-two scale per block (scaling.mx) from the given rule."""

    nvfp4_options = False
    padded = True

    def __init__(self, rule):
        self.rule = rule

    def quantize(self, spec, xf, rounding, block_2d, rbits, sr_bits, sign, fos, row_scaled) -> _Raw:
        elem = ELEMENTS[spec.element]
        elems, codes, negative = scaling.mx(
            xf, elem, self.rule, rounding, block_2d, rbits, sr_bits, spec.block, sign
        )
        return _Raw(elems, codes, None, negative)

    def dequantize(self, elems, scale, amax, rcp) -> torch.Tensor:
        rows, cols = elems.shape
        blocks = elems.view(rows, scale.shape[1], -1)
        return (blocks * e8m0_to_float(scale).unsqueeze(-1)).view(rows, cols)

    def parts(self, raw: _Raw, rcp) -> Parts:
        return Parts(self.dequantize(raw.elems, raw.scale, None, rcp), None)


class _NVFP4:
    """nvfp4: FP32 tensor scale + E4M3 block scales (scaling.nvfp4), or TE 2.20's 4over6 / row-scaled."""

    nvfp4_options = True
    padded = True

    def quantize(self, spec, xf, rounding, block_2d, rbits, sr_bits, sign, fos, row_scaled) -> _Raw:
        if fos is not None:
            out = scaling.nvfp4_4over6(xf, block_2d, fos.err_mode, fos.e4m3_max, spec.block, sign, row_scaled)
        else:
            out = scaling.nvfp4(xf, rounding, block_2d, rbits, sr_bits, spec.block, sign, row_scaled)
        return _Raw(*out)

    def dequantize(self, elems, scale, amax, rcp) -> torch.Tensor:
        rows, cols = elems.shape
        blocks = elems.view(rows, scale.shape[1], -1)
        # TE's dequantize_fp4_kernel: final_scale = (s_blk * amax) * fp32(1 / (6 * 448)) (rcp). s_blk * amax
        # overflows FP32 for amax > ~7.6e35 (TE then returns inf); only there we reassociate.
        amax = amax.view(-1, 1)  # [1, 1] or one per row (row-scaled)
        s_amax = scale.float() * amax
        final = torch.where(torch.isinf(s_amax), scale.float() * (amax * rcp), s_amax * rcp)
        return (blocks * final.unsqueeze(-1)).view(rows, cols)

    def parts(self, raw: _Raw, rcp) -> Parts:
        rows, pcols = raw.elems.shape
        values = (raw.elems.view(rows, raw.scale.shape[1], -1) * raw.scale.float().unsqueeze(-1)).view(
            rows, pcols
        )
        return Parts(values, raw.amax * rcp)


# Scale rule (registry.FormatSpec.scale) -> how it quantizes, dequantizes and feeds a GEMM.
SCHEMES = {
    "fp32_tensor": _PerTensor(),
    "e8m0_te": _MX(scaling.e8m0_te),
    "e8m0_ocp": _MX(scaling.e8m0_ocp),
    "nvfp4": _NVFP4(),
}


def _scheme(spec: FormatSpec):
    return SCHEMES[spec.scale]


def _option_error(option: str, got: str, extra: str = "") -> ValueError:
    takes = " or ".join(repr(n) for n, f in _REGISTRY.items() if _scheme(f).nvfp4_options)
    return ValueError(f"{option} needs fmt={takes}{extra}, got {got}")


def _rcp(four_over_six: "FourOverSix | None") -> float:
    return (four_over_six or FourOverSix()).rcp_decode


def _quantize_rows(
    x2: torch.Tensor, fmt: str, rounding: str, block_2d: bool, generator, sign=False, seed=None, sr_bits=8,
    four_over_six: FourOverSix | None = None, row_scaled: bool = False,
) -> _Raw:  # fmt: skip
    """x2: [rows, cols] any float dtype -> the scale rule's output on the padded FP32 tensor."""
    xf = x2.float().contiguous()
    spec = get_format(fmt)
    scheme = _scheme(spec)
    if row_scaled and not scheme.nvfp4_options:
        raise _option_error("row_scaled", repr(fmt))
    rbits = None
    if four_over_six is not None:
        if not scheme.nvfp4_options or rounding != "nearest":
            raise _option_error("four_over_six", f"{fmt!r}, {rounding!r}", " and rounding='nearest'")
    elif rounding == "stochastic":
        rows, cols = xf.shape
        rbits = random_bits(rows, cols, _sr_seed(seed, generator), sr_bits, xf.device)
    if scheme.padded:
        xf = scaling.pad_to(xf, 1, spec.block)
        if rbits is not None:
            rbits = scaling.pad_to(rbits, 1, spec.block)
    return scheme.quantize(spec, xf, rounding, block_2d, rbits, sr_bits, sign, four_over_six, row_scaled)


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    rounding: str = "nearest",
    block_2d: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sr_bits: int = 8,
    four_over_six: FourOverSix | None = None,
    row_scaled: bool = False,
) -> QuantizedTensor:
    """Quantize `x` to `fmt` (a registry.FORMATS name) along its last dimension.

    rounding: nearest (to even) | stochastic. block_2d: square tiles (16x16 nvfp4, 32x32 mxfp8/mxfp4) over
    the last two dimensions so that x and x^T see the same values; ignored for the per-tensor FP8 formats.
    Stochastic rounding: sr_bits random bits per element (8: native TE's distribution, 24: unbiased to
    2**-24; formats.round_to_format) from Philox(seed), the seed drawn from `generator` when not given.
    The Triton kernels draw the same bits for the same seed (triton_kernels.fake_quantize_2d).
    four_over_six: NVFP4 with TE 2.20's adaptive 4-or-6 block scaling (FourOverSix; torch path only).
    row_scaled: NVFP4 with one FP32 amax per row (TE 2.20's row_scaled_nvfp4; 1x16 blocks; torch path only).
    """
    check_args(fmt, rounding, sr_bits)
    raw = _quantize_rows(
        _rows(x), fmt, rounding, block_2d, generator, sign=True, seed=seed, sr_bits=sr_bits,
        four_over_six=four_over_six, row_scaled=row_scaled,
    )  # fmt: skip
    spec = get_format(fmt)
    codes = encode_elements(ELEMENTS[spec.element], raw.elems, raw.negative)
    e4m3_max = four_over_six.e4m3_max if four_over_six is not None else 448
    amax = raw.amax.view(-1) if row_scaled and raw.amax is not None else raw.amax
    return QuantizedTensor(fmt, codes, raw.scale, amax, x.shape, x.dtype, block_2d, e4m3_max)


def _finish(values: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    cols = shape[-1] if len(shape) else 1
    return values[:, :cols].reshape(shape).to(dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Back to q.dtype and q.shape."""
    spec = get_format(q.fmt)
    elems = decode_elements(ELEMENTS[spec.element], q.codes)
    rcp = FourOverSix(e4m3_max=q.e4m3_max).rcp_decode
    return _finish(_scheme(spec).dequantize(elems, q.scale, q.amax, rcp), q.shape, q.dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    rounding: str = "nearest",
    block_2d: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    sr_bits: int = 8,
    four_over_six: FourOverSix | None = None,
    row_scaled: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize: same shape and dtype as `x`; equals dequantize(quantize(x)) bit for bit."""
    check_args(fmt, rounding, sr_bits)
    if x.numel() == 0:
        return x.clone()
    raw = _quantize_rows(
        _rows(x), fmt, rounding, block_2d, generator, seed=seed, sr_bits=sr_bits, four_over_six=four_over_six,
        row_scaled=row_scaled,
    )  # fmt: skip
    values = _scheme(get_format(fmt)).dequantize(raw.elems, raw.scale, raw.amax, _rcp(four_over_six))
    return _finish(values, x.shape, x.dtype)


def quantize_parts(
    x2: torch.Tensor,
    fmt: str,
    rounding: str,
    block_2d: bool = False,
    generator=None,
    *,
    seed: int | None = None,
    sr_bits: int = 8,
    four_over_six: FourOverSix | None = None,
    row_scaled: bool = False,
) -> Parts:
    """Quantize a 2-D tensor for a GEMM (see Parts); padding along the last dimension is dropped."""
    cols = x2.shape[1]
    raw = _quantize_rows(
        x2, fmt, rounding, block_2d, generator, seed=seed, sr_bits=sr_bits, four_over_six=four_over_six,
        row_scaled=row_scaled,
    )  # fmt: skip
    parts = _scheme(get_format(fmt)).parts(raw, _rcp(four_over_six))
    return Parts(parts.values[:, :cols], parts.factor)

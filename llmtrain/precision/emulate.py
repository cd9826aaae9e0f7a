"""Fake quantization of one 2-D GEMM operand for the Megatron engine's emulated back end (te_custom.py).

The Triton kernels (triton_kernels.py) where the format has one (registry.FormatSpec.triton), checked once
per configuration against the torch reference on a GPU (kernel_check.py); else the torch reference itself
(kernel_check.reference: the same quantizer the torch engine runs, RHT included). So a format registered
without a kernel, such as MXFP4, runs emulated through the same TE custom-recipe path, only slower.
"""

import torch

from llmtrain.precision import kernel_check
from llmtrain.precision.registry import get_format


def fake_quantize_2d(
    x: torch.Tensor,
    fmt: str,
    *,
    axis: int,
    rounding: str,
    block_2d: bool,
    rht_signs: torch.Tensor | None,
    seed: int,
    sr_bits: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """triton_kernels.fake_quantize_2d's result (blocks along `axis`, RHT first when rht_signs is given)."""
    how = dict(
        axis=axis, rounding=rounding, block_2d=block_2d, rht_signs=rht_signs, seed=seed, sr_bits=sr_bits
    )
    if get_format(fmt).triton:
        from llmtrain.precision.triton_kernels import fake_quantize_2d as kernel

        y = kernel(x, fmt, out_dtype=out_dtype, out=out, **how)
        if x.is_cuda:  # native kernels: once per configuration, compared with the torch reference
            kernel_check.check_once(y, x, fmt, **how)
        return y
    y = kernel_check.reference(x, fmt, axis, rounding, block_2d, rht_signs, seed, sr_bits, out_dtype)
    if out is None:
        return y.contiguous()  # laid out like x, as the kernels' output
    return out.copy_(y)

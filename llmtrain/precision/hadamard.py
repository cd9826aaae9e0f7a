"""Random Hadamard transform (RHT) along the last dimension, in blocks of `size` (TE: 16).

T = diag(signs) @ H / sqrt(size) is orthogonal, so applying it to both operands of a GEMM along the
reduction dimension leaves the product unchanged: (A T)(B T)^T = A B^T. Outliers get spread over the
block, which shrinks block amaxes relative to typical values before quantization.
"""

import torch

# TE's fixed wgrad sign vector (transformer_engine/pytorch/custom_recipes/reference_nvfp4.py).
TE_SIGNS = (1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0)


def hadamard_matrix(size: int, signs: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """diag(signs) @ H_size / sqrt(size) in FP32 (Sylvester construction; signs=None: all +1)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"size={size}: the Hadamard size must be a power of two")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if signs is not None:
        signs = torch.as_tensor(signs, dtype=torch.float32, device=device)
        if signs.shape != (size,):
            raise ValueError(f"signs must have shape ({size},), got {tuple(signs.shape)}")
        h = signs.unsqueeze(1) * h
    return h * (1.0 / size**0.5)  # 1/4 for size 16: exact


def random_signs(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1


def hadamard(x: torch.Tensor, size: int = 16, signs: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (diag(signs) H / sqrt(size)) per `size`-block of the last dimension.

    Same shape and dtype as `x`; the last dimension must be a multiple of `size` (ValueError otherwise).
    The result is rounded to x's dtype, as Transformer Engine does: its RHT kernels convert the FP32
    accumulator to the input dtype (`cvt.rn.bf16x2.f32`) before the amax and the quantization, and its
    reference quantizer multiplies in the input dtype. We sum in FP64, where with H's entries +-1/4 (size
    16) every product and, for BF16 inputs (and FP32 ones whose block spans less than 2**25), the sum are
    exact, then round to FP32 and from there to x's dtype (FP64 inputs stay FP64): an FP32 accumulator that is exact gives the
    same, in any summation order, so the Triton kernels (llmtrain.precision.triton_kernels) reproduce it
    bit for bit. For BF16 inputs this equals TE's reference element for element (tests/unit/
    test_quant_te_reference.py); for FP32 inputs TE's FP32 matmul rounds in its own order (last bit).
    """
    if x.shape[-1] % size:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the Hadamard size {size}")
    t = hadamard_matrix(size, signs, x.device).double()
    out = x.double().reshape(-1, size) @ t
    out = out.view(x.shape)
    return out if x.dtype == torch.float64 else out.float().to(x.dtype)

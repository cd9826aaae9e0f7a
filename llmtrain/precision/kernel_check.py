"""A once-per-process check that the Triton kernels give the reference quantizer's values on this GPU.

The kernels are tested bit for bit against `fake_quantize` in Triton's CPU interpreter in CI, but native
code differs from interpreted code exactly where a bug would hide (the hardware's BF16 conversion, the
compiler's register layout). So the first time a process quantizes with a given configuration on a GPU,
the emulated path compares the kernel's result with the torch reference on that same tensor and stops the
run in one line if they differ: a silent error there would train every GEMM on wrong values. One extra
reference quantization per configuration and process; `LLMTRAIN_KERNEL_CHECK=0` turns it off.
"""

import torch

from llmtrain.errors import UserError
from llmtrain.precision.hadamard import hadamard
from llmtrain.precision.quantize import fake_quantize
from llmtrain.precision.switches import switch

_checked: set[tuple] = set()


def enabled() -> bool:
    return switch("LLMTRAIN_KERNEL_CHECK", default=True)


def reference(x, fmt, axis, rounding, block_2d, rht_signs, seed, sr_bits, dtype) -> torch.Tensor:
    """What fake_quantize_2d(x, ...) must return: the torch path on x's `axis` layout (RHT first)."""
    xt = x if axis == 1 else x.t().contiguous()
    cols = xt.shape[1]
    if rht_signs is not None:  # transformed zero-padded to whole blocks, in x's dtype (as TE rounds it)
        xt = hadamard(torch.nn.functional.pad(xt, (0, -cols % 16)), 16, rht_signs)
    y = fake_quantize(xt.float(), fmt, rounding=rounding, block_2d=block_2d, seed=seed, sr_bits=sr_bits)
    y = y[:, :cols].to(dtype)
    return y if axis == 1 else y.t()


def check_once(out, x, fmt, *, axis, rounding, block_2d, rht_signs, seed, sr_bits) -> None:
    """Compare a kernel result `out` with the reference, the first time this configuration is seen."""
    key = (
        x.device.type,
        x.dtype,
        out.dtype,
        fmt,
        axis,
        rounding,
        bool(block_2d),
        rht_signs is not None,
        sr_bits,
    )
    if key in _checked or not enabled():
        return
    ref = reference(x, fmt, axis, rounding, block_2d, rht_signs, seed, sr_bits, out.dtype)
    same = (out == ref) | (out.isnan() & ref.isnan())
    if not bool(same.all()):
        raise UserError(
            f"precision: the Triton {fmt} kernel ({'row' if axis == 1 else 'column'}-wise, rounding={rounding}, "
            f"2-D blocks={bool(block_2d)}, RHT={rht_signs is not None}) differs from the reference quantizer "
            f"on this {torch.cuda.get_device_name() if x.is_cuda else x.device.type} in "
            f"{int((~same).sum())} of {same.numel()} values; its results cannot be trusted here: run "
            "`pytest tests/unit/test_triton_kernels.py` on this machine and report it (LLMTRAIN_KERNEL_CHECK=0 "
            "skips this check)"
        )
    _checked.add(key)

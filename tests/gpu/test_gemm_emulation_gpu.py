"""The torch engine's emulated GEMM on the GPU: FP32 accumulation, factor on the FP32 result, one rounding."""

import pytest
import torch

from llmtrain.precision import linear
from llmtrain.precision.quantize import quantize_parts
from tests.megatron_helpers import record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_e4m3"])
def test_cuda_gemm_rounds_once_like_native_te(fmt):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 2048, generator=g).to(torch.bfloat16).cuda()
    b = torch.randn(512, 2048, generator=g).to(torch.bfloat16).cuda()
    pa, pb = quantize_parts(a, fmt, "nearest"), quantize_parts(b, fmt, "nearest")
    y = linear._gemm(pa, pb, torch.bfloat16)
    native = ((pa.values.double() @ pb.values.double().t()) * (pa.factor * pb.factor).double()).to(
        torch.bfloat16
    )
    differ = (y != native).float().mean().item()
    record(f"gemm_emulation_{fmt}", {"differ": differ, "mm_out_dtype": linear._MM_OUT_DTYPE[0]})
    assert y.dtype == torch.bfloat16 and differ <= 1e-3

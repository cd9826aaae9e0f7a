"""TE 2.20's NVFP4 options on the GPU: our torch-path 4over6 and row-scaled NVFP4 on CUDA vs TE's reference
quantizer on CUDA (bit for bit, as on the CPU), and vs TE's native NVFP4Quantizer where the GPU has it
(Blackwell).

Run: pytest -m gpu tests/gpu/test_nvfp4_options_gpu.py
"""

import pytest
import torch

te = pytest.importorskip("transformer_engine.pytorch")  # TE's torch extension first, then its submodules

from transformer_engine.pytorch.custom_recipes import reference_nvfp4, reference_utils  # noqa: E402

from llmtrain.precision import quantize  # noqa: E402
from llmtrain.precision.quantize import FourOverSix  # noqa: E402
from tests.precision_cases import adversarial_tensors  # noqa: E402

pytestmark = pytest.mark.gpu
CASES = {  # name -> (FourOverSix | None, row_scaled)
    "4o6-MAE-256": (FourOverSix("MAE", 256), False),
    "4o6-MSE-448": (FourOverSix("MSE", 448), False),
    "row_scaled": (None, True),
    "row_scaled-4o6-MAE-256": (FourOverSix("MAE", 256), True),
}


def _tensors(dtype):
    names = ("normal", "heavy_tail", "row_ranges", "one_outlier", "zero_rows")  # tests/precision_cases.py
    return adversarial_tensors(dtype, rows=256, cols=512, device="cuda", seed=5, names=names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_matches_te_reference(case, dtype):
    fos, row_scaled = CASES[case]
    extra = (
        dict(nvfp4_use_4over6=True, nvfp4_e4m3_max=fos.e4m3_max, nvfp4_4over6_err_mode=fos.err_mode)
        if fos
        else {}
    )
    ref_q = reference_nvfp4.NVFP4QuantizerRef(dtype=reference_utils.Fp4Formats.E2M1, rowwise=True,
                                              columnwise=False, row_scaled_nvfp4=row_scaled, **extra)  # fmt: skip
    for name, x in _tensors(dtype).items():
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", four_over_six=fos, row_scaled=row_scaled)
        assert torch.equal(q.codes, ref.data), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8)), name
        assert torch.equal(q.amax, ref.global_amax_row), name


@pytest.mark.skipif(not te.is_nvfp4_available(), reason="native NVFP4 needs Blackwell")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_te_native_quantizer(case):
    """Blackwell: TE's NVFP4Quantizer with the same options (row-wise usage, no RHT/SR/2-D)."""
    fos, row_scaled = CASES[case]
    extra = (
        dict(nvfp4_use_4over6=True, nvfp4_e4m3_max=fos.e4m3_max, nvfp4_4over6_err_mode=fos.err_mode)
        if fos
        else {}
    )
    quantizer = te.NVFP4Quantizer(rowwise=True, columnwise=False, with_rht=False, with_post_rht_amax=False,
                                  with_2d_quantization=False, stochastic_rounding=False,
                                  row_scaled_nvfp4=row_scaled, **extra)  # fmt: skip
    for name, x in _tensors(torch.bfloat16).items():
        ref = quantizer(x)
        q = quantize(x, "nvfp4", four_over_six=fos, row_scaled=row_scaled)
        rows, cols = x.shape
        assert torch.equal(q.codes, ref._rowwise_data.view(torch.uint8)[:rows, : cols // 2]), name
        scales = ref._rowwise_scale_inv.view(torch.uint8)[:rows, : cols // 16]
        assert torch.equal(q.scale.view(torch.uint8), scales), name
        assert torch.equal(q.amax, ref._amax_rowwise.view(-1)), name

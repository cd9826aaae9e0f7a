"""Our quantizers vs Transformer Engine on the GPU host: fraction of identical codes and scales.

- FP8 current scaling vs TE's native Float8CurrentScalingQuantizer (E4M3 and E5M2).
- NVFP4 vs TE's reference quantizer (custom_recipes.reference_nvfp4.NVFP4QuantizerRef), 1x16 and 16x16,
  plus BF16/FP32 + RHT row- and column-wise (torch path and Triton kernel); vs the native NVFP4Quantizer
  too where the GPU has it (Blackwell).
- Stochastic rounding's deterministic parts (amax, block scales, codes within one step of nearest); the
  random bits themselves differ from TE's by design.
- MXFP8 vs the native MXFP8Quantizer where available (Blackwell); elsewhere vs the E8M0 rule of TE's
  own test reference (tests/pytorch/test_mxfp8_2d_quantize.py: smallest power of two >= amax/448).
Inputs are finite: for NaN/Inf we propagate NaN on purpose where TE saturates / skips them
(docs/precision.md).

Run: pytest -m gpu tests/gpu/test_te_parity.py -s   (LLMTRAIN_PARITY_REPORT=path.json to save the table)
"""

import json
import os

import pytest
import torch

te = pytest.importorskip("transformer_engine.pytorch")  # TE's torch extension first, then its submodules

from transformer_engine.pytorch.custom_recipes import reference_nvfp4, reference_utils  # noqa: E402

from llmtrain.precision import hadamard, quantize  # noqa: E402
from llmtrain.precision.hadamard import TE_SIGNS  # noqa: E402
from tests.precision_cases import adversarial_tensors  # noqa: E402

pytestmark = pytest.mark.gpu
REPORT: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    width = max(map(len, REPORT), default=0)
    print("\nfraction of identical elements (ours vs TE):")
    for k, v in sorted(REPORT.items()):
        print(f"  {k:<{width}}  {v:.6f}")
    if path := os.environ.get("LLMTRAIN_PARITY_REPORT"):
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=2, sort_keys=True)


def _tensors(dtype):
    names = ("normal", "heavy_tail", "wide_range", "tiny", "scale_overflow", "huge", "one_outlier", "zero_blocks",
             "all_zero", "subnormal", "e2m1_ties")  # tests/precision_cases.py, whole blocks only  # fmt: skip
    return adversarial_tensors(dtype, rows=128, cols=512, device="cuda", seed=11, names=names)


def _record(key: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, (key, ours.shape, theirs.shape)
    REPORT[key] = (ours == theirs).float().mean().item()


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_current_scaling_vs_te_native(fmt, dtype):
    import transformer_engine_torch as tex

    te_dtype = tex.DType.kFloat8E4M3 if fmt == "fp8_e4m3" else tex.DType.kFloat8E5M2
    quantizer = te.Float8CurrentScalingQuantizer(
        te_dtype, torch.device("cuda"), rowwise=True, columnwise=False
    )
    for name, x in _tensors(dtype).items():
        ref = quantizer(x)
        q = quantize(x, fmt)
        key = f"{fmt}/{str(dtype)[6:]}/{name}"
        _record(key + "/codes", q.codes, ref._data.view(torch.uint8))
        _record(key + "/scale_inv", q.scale, ref._scale_inv.view(1).float())
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(fmt + "/" + str(dtype)[6:]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_nvfp4_vs_te_reference(tile, dtype):
    ref_q = reference_nvfp4.NVFP4QuantizerRef(dtype=reference_utils.Fp4Formats.E2M1, rowwise=True,
                                              columnwise=False, quant_tile_shape=tile)  # fmt: skip
    prefix = f"nvfp4_ref/{tile[0]}x{tile[1]}/{str(dtype)[6:]}"
    for name, x in _tensors(dtype).items():
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", block_2d=tile == (16, 16))
        _record(f"{prefix}/{name}/codes", q.codes, ref.data)
        _record(f"{prefix}/{name}/block_scales", q.scale.view(torch.uint8), ref.scale.view(torch.uint8))
        _record(f"{prefix}/{name}/amax", q.amax, ref.global_amax_row)
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(prefix))


# FP32 RHT: TE's reference (a GPU matmul) and ours sum the 16 products in different orders. Per output,
# |error| <= 15u * sum|x_j| / 4 <= 15u * ||x||_2 = 15u * ||y||_2 <= 60u * max|y| of that block (the
# normalised 16-point transform is orthogonal): each amax is within 60u of the exact one, so the two agree
# within 120u relative (u = 2**-24); codes and block scales are still compared element for element.
FP32_RHT_AMAX_REL = 120 * 2.0**-24


def _record_amax_fp32(key: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    rel = ((ours.float() - theirs.float()).abs() / theirs.float().abs().clamp_min(1e-30)).max().item()
    REPORT[key] = float(rel <= FP32_RHT_AMAX_REL)
    REPORT["amax_rel_diff/" + key] = rel  # the report shows the size, outside the prefixes asserted on


# Tensors whose 16-blocks span < 2**12 in magnitude: TE's FP32 (tensor-core) accumulation of the RHT is
# exact there, so its summation order cannot matter and BF16 + RHT must agree bit for bit.
EXACT_RHT = ("normal", "zero_blocks", "all_zero", "e2m1_ties")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("layout", ["columnwise", "rowwise"])
def test_nvfp4_rht_vs_te_reference(layout, tile, dtype):
    """TE's reference applies the RHT to its column-wise operand x^T; our row-wise RHT of x is that
    operand of x^T. The transform is rounded to the input dtype (BF16) as in TE, by the torch path
    (hadamard) and the Triton kernel (fake_quantize_2d, compared as dequantized values)."""
    from llmtrain.precision import dequantize
    from llmtrain.precision.triton_kernels import fake_quantize_2d

    ref_q = reference_nvfp4.NVFP4QuantizerRef(dtype=reference_utils.Fp4Formats.E2M1, rowwise=False,
                                              columnwise=True, with_rht=True, quant_tile_shape=tile)  # fmt: skip
    signs = torch.tensor(TE_SIGNS, device="cuda")
    prefix = f"nvfp4_ref_rht/{layout}/{tile[0]}x{tile[1]}/{str(dtype)[6:]}"
    block_2d = tile == (16, 16)
    for name, x in _tensors(dtype).items():
        x = x if layout == "columnwise" else x.t().contiguous()
        ref = ref_q.quantize(x)
        q = quantize(hadamard(x.t().contiguous(), 16, signs), "nvfp4", block_2d=block_2d)
        _record(f"{prefix}/{name}/codes", q.codes, ref.data_t)
        _record(f"{prefix}/{name}/block_scales", q.scale.view(torch.uint8), ref.scale_t.view(torch.uint8))
        if dtype == torch.bfloat16:  # the BF16 transform is exact in FP32: the amax must match bit for bit
            _record(f"{prefix}/{name}/amax", q.amax, ref.global_amax_col)
        else:
            _record_amax_fp32(f"{prefix}/{name}/amax", q.amax, ref.global_amax_col)
        tri = fake_quantize_2d(x, "nvfp4", axis=0, block_2d=block_2d, rht_signs=signs)
        _record(f"{prefix}/{name}/triton_vs_torch", tri.t().contiguous(), dequantize(q))
    if dtype == torch.bfloat16:
        exact = [k for k in REPORT if k.startswith(prefix) and k.split("/")[-2] in EXACT_RHT]
        assert all(REPORT[k] == 1.0 for k in exact), {k: REPORT[k] for k in exact}
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(prefix) and k.endswith("triton_vs_torch"))
    assert min(v for k, v in REPORT.items() if k.startswith(prefix)) > 0.999


@pytest.mark.parametrize("sr_bits", [8, 24])
def test_nvfp4_rht_sr_deterministic_parts_vs_te_reference(sr_bits):
    """BF16 + RHT + stochastic rounding: the amax and block scales do not depend on the random bits and
    equal TE's (reference, round-to-nearest); every FP4 code is the nearest one or its neighbour toward
    the value (same sign, magnitude index within 1). The Triton kernel draws the same bits as the torch
    path for the same seed."""
    from llmtrain.precision import dequantize
    from llmtrain.precision.formats import unpack_fp4
    from llmtrain.precision.triton_kernels import fake_quantize_2d

    ref_q = reference_nvfp4.NVFP4QuantizerRef(dtype=reference_utils.Fp4Formats.E2M1, rowwise=False,
                                              columnwise=True, with_rht=True)  # fmt: skip
    signs = torch.tensor(TE_SIGNS, device="cuda")
    prefix = f"nvfp4_ref_rht_sr{sr_bits}"
    for name, x in _tensors(torch.bfloat16).items():
        if name not in EXACT_RHT:
            continue
        ref = ref_q.quantize(x)
        h = hadamard(x.t().contiguous(), 16, signs)
        q = quantize(h, "nvfp4", rounding="stochastic", seed=77, sr_bits=sr_bits)
        _record(f"{prefix}/{name}/block_scales", q.scale.view(torch.uint8), ref.scale_t.view(torch.uint8))
        _record(f"{prefix}/{name}/amax", q.amax, ref.global_amax_col)
        ours, theirs = unpack_fp4(q.codes).int(), unpack_fp4(ref.data_t).int()
        step = ((ours & 7) - (theirs & 7)).abs()
        same_sign = ((ours ^ theirs) & 8 == 0) | ((ours & 7) == 0) | ((theirs & 7) == 0)
        _record(
            f"{prefix}/{name}/codes_within_one_step", (step <= 1) & same_sign, torch.ones_like(step).bool()
        )
        tri = fake_quantize_2d(x, "nvfp4", axis=0, rht_signs=signs, rounding="stochastic", seed=77,
                               sr_bits=sr_bits)  # fmt: skip
        _record(f"{prefix}/{name}/triton_vs_torch", tri.t().contiguous(), dequantize(q))
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(prefix)), REPORT


def _mxfp8_te_test_rule(x):
    """E8M0 = smallest power of two >= amax/448 (TE's test reference), elements = E4M3(x / scale)."""
    rows, cols = x.shape
    xb = x.float().view(rows, cols // 32, 32)
    val = (xb.abs().amax(-1) / 448.0).contiguous()
    bits = val.view(torch.int32)
    exp, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    up = (mant > 0) & (exp != 254) & ~((exp == 0) & (mant <= 0x400000))
    code = torch.where(val == 0, torch.zeros_like(exp), exp + up.int())
    scale = torch.pow(2.0, code.float() - 127)
    data = (xb / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8).view(rows, cols)
    return data, code.to(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp8_vs_te(dtype):
    native = te.is_mxfp8_available()
    if native:
        import transformer_engine_torch as tex

        quantizer = te.MXFP8Quantizer(tex.DType.kFloat8E4M3, rowwise=True, columnwise=False)
    prefix = f"mxfp8_{'native' if native else 'te_test_rule'}/{str(dtype)[6:]}"
    for name, x in _tensors(dtype).items():
        q = quantize(x, "mxfp8")
        if native:
            ref = quantizer(x)
            data, scales = ref._rowwise_data.view(torch.uint8), ref._rowwise_scale_inv.view(torch.uint8)
            scales = scales[: x.shape[0], : x.shape[1] // 32]
        else:
            data, scales = _mxfp8_te_test_rule(x)
        _record(f"{prefix}/{name}/codes", q.codes, data)
        _record(f"{prefix}/{name}/e8m0", q.scale, scales)
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(prefix))


@pytest.mark.skipif(not te.is_nvfp4_available(), reason="native NVFP4 needs Blackwell")
@pytest.mark.parametrize("block_2d", [False, True])
def test_nvfp4_vs_te_native(block_2d):
    quantizer = te.NVFP4Quantizer(rowwise=True, columnwise=False, with_rht=False, with_post_rht_amax=False,
                                  with_2d_quantization=block_2d, stochastic_rounding=False)  # fmt: skip
    prefix = f"nvfp4_native/{'2d' if block_2d else '1d'}"
    for name, x in _tensors(torch.bfloat16).items():
        ref = quantizer(x)
        q = quantize(x, "nvfp4", block_2d=block_2d)
        rows, cols = x.shape
        _record(f"{prefix}/{name}/codes", q.codes, ref._rowwise_data.view(torch.uint8)[:rows, : cols // 2])
        scales = ref._rowwise_scale_inv.view(torch.uint8)[:rows, : cols // 16]
        _record(f"{prefix}/{name}/block_scales", q.scale.view(torch.uint8), scales)
    assert all(v == 1.0 for k, v in REPORT.items() if k.startswith(prefix))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4"])
def test_cuda_matches_cpu(fmt):
    """Our implementation is device independent (same codes and scales on CPU and CUDA)."""
    for name, x in _tensors(torch.float32).items():
        a, b = quantize(x, fmt), quantize(x.cpu(), fmt)
        _record(f"cuda_vs_cpu/{fmt}/{name}", a.codes.cpu(), b.codes)
        assert torch.equal(a.codes.cpu(), b.codes) and torch.equal(a.scale.cpu(), b.scale), name

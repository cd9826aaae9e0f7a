"""Bit-exactness against Transformer Engine 2.20's pure-Python reference quantizers, on the CPU.

The `te_reference` fixture (tests/conftest.py) downloads TE's pure-Python wheel once (pip download
--no-deps) and imports custom_recipes/reference_*.py with TE's compiled parts stubbed. A failed download
fails these tests; offline, set LLMTRAIN_TE_SRC=<unpacked wheel> or LLMTRAIN_TE_OFFLINE=1 (skips them).
"""

import pytest
import torch

from llmtrain.precision import hadamard, quantize
from llmtrain.precision.formats import pack_fp4, unpack_fp4
from llmtrain.precision.hadamard import TE_SIGNS
from tests.precision_cases import adversarial_tensors

# The adversarial set (tests/precision_cases.py) less `ragged` and the row-scaled cases: TE's reference
# quantizers take whole blocks.
TE_CASES = ("normal", "heavy_tail", "wide_range", "tiny", "scale_overflow", "huge", "one_outlier", "e2m1_ties",
            "zero_blocks", "all_zero", "subnormal")  # fmt: skip


def _tensors(dtype, extra: tuple[str, ...] = ()):
    return adversarial_tensors(dtype, rows=32, cols=256, seed=7, names=TE_CASES + extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,te_dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_current_scaling_matches_te_reference(te_reference, dtype, fmt, te_dtype):
    cs = te_reference.current_scaling
    ref_q = cs.CurrentScalingQuantizerRef(dtype=te_dtype, rowwise=True, columnwise=False)
    for name, x in _tensors(dtype).items():
        ref = ref_q.quantize(x)
        q = quantize(x, fmt)
        assert torch.equal(q.codes, ref.data.view(torch.uint8)), name
        if name == "scale_overflow" and dtype == torch.bfloat16:
            # 448 / amax overflows FP32. TE's kernel (compute_scale_from_amax) then uses FP32 max; the Python
            # reference uses the *input* dtype's max (BF16). We follow the kernel; codes agree either way.
            assert torch.equal(q.scale, torch.reciprocal(torch.tensor([torch.finfo(torch.float32).max]))), (
                name
            )
            continue
        assert torch.equal(q.scale, ref.scale.view(1)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_nvfp4_rowwise_matches_te_reference(te_reference, dtype, tile):
    nv = te_reference.nvfp4
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=False,
                                 quant_tile_shape=tile)  # fmt: skip
    for name, x in _tensors(dtype).items():
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", block_2d=tile == (16, 16))
        assert torch.equal(q.codes, ref.data), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8)), name
        assert torch.equal(q.amax, ref.global_amax_row), name


def test_nvfp4_rht_columnwise_fp32_matches_te_reference(te_reference):
    """Columnwise (wgrad) operand with RHT: TE transposes, applies the signed 16x16 Hadamard, re-takes amax.

    Our RHT is the correctly rounded FP32 transform (exact FP64 sum, one rounding); TE's reference sums in
    FP32 in its matmul's order, so the transformed values (and the amax taken from them) can differ in the
    last bit. On these tensors that never changes a code or a block scale; the amax agrees to 2 ulp.
    """
    nv = te_reference.nvfp4
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=False, columnwise=True,
                                 with_rht=True)  # fmt: skip
    for name, x in _tensors(torch.float32).items():
        ref = ref_q.quantize(x)
        q = quantize(hadamard(x.t().contiguous(), 16, torch.tensor(TE_SIGNS)), "nvfp4")
        assert torch.equal(q.codes, ref.data_t), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale_t.view(torch.uint8)), name
        torch.testing.assert_close(q.amax, ref.global_amax_col, rtol=2.5e-7, atol=0, msg=name)


def test_te_reference_fp4_codec_matches_ours(te_reference):
    """TE's threshold-table encoder vs our nearest-even grid rounding, on a dense sweep of [-7, 7]."""
    nv = te_reference.nvfp4
    from llmtrain.precision.formats import E2M1, e2m1_encode, round_to_format

    v = torch.linspace(-7, 7, 28001).view(1, -1)
    v = torch.cat([v, torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -0.0]])], 1)
    v = v[:, : v.shape[1] // 2 * 2]
    clipped = v.clamp(-6, 6)
    ours = pack_fp4(e2m1_encode(round_to_format(clipped, E2M1), clipped < 0))
    assert torch.equal(ours, nv.cast_to_fp4x2(clipped))


def _has_subnormal_products(x: torch.Tensor) -> bool:
    """Whether some x/4 falls below FP32's normal range. TE's reference runs the RHT as a BF16 matmul,
    which on the CPU (oneDNN) flushes subnormals to zero; our transform (and a GPU's) keeps them. Only
    `scale_overflow` (|x| ~ 1e-37) is such a tensor here."""
    return bool(((x.float().abs() * 0.25 < 2.0**-126) & (x != 0)).any())


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("layout", ["columnwise", "rowwise"])
def test_nvfp4_rht_bf16_matches_te_reference(te_reference, tile, layout):
    """BF16 + RHT, the GPU training case: TE rounds the transform to BF16 before the amax; so do we.

    TE's reference applies the RHT to its column-wise (wgrad) operand, x^T. Our row-wise RHT of x is
    that operand of x^T, so `rowwise` feeds TE x^T. Codes, block scales and the amax agree bit for bit.
    """
    nv = te_reference.nvfp4
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=False, columnwise=True,
                                 with_rht=True, quant_tile_shape=tile)  # fmt: skip
    signs = torch.tensor(TE_SIGNS)
    tensors = _tensors(torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    for trial in range(3):  # the case: BF16 512x256 (FP32-kept RHT: ~1% codes, ~2% scales differ)
        tensors[f"normal_512x256_{trial}"] = torch.randn(512, 256, generator=g).bfloat16()
    for name, x in tensors.items():
        if _has_subnormal_products(x):
            continue
        x = x if layout == "columnwise" else x.t().contiguous()
        ref = ref_q.quantize(x)
        h = hadamard(x.t().contiguous(), 16, signs)
        assert h.dtype == torch.bfloat16
        q = quantize(h, "nvfp4", block_2d=tile == (16, 16))
        assert torch.equal(unpack_fp4(q.codes), unpack_fp4(ref.data_t)), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale_t.view(torch.uint8)), name
        assert torch.equal(q.amax, ref.global_amax_col), name


def _fp32_sum_exact(x: torch.Tensor) -> torch.Tensor:
    """Per 16-block of BF16 x: whether an FP32 accumulator sums the 16 terms +-x/4 exactly in any order.

    Each term has 8 significant bits, so all are multiples of 2**(e_min - 9) and every partial sum is at
    most 2**(e_max + 3): exact when e_max - e_min <= 12 and no term is an FP32 subnormal (TE's reference
    runs the transform as a BF16 matmul, which oneDNN computes with subnormals flushed to zero).
    """
    a = x.float().abs().view(-1, 16)
    e = torch.floor(torch.log2(a))
    nz = a > 0
    e_max = torch.where(nz, e, -1000.0).amax(1)
    e_min = torch.where(nz, e, 1000.0).amin(1)
    normal = torch.where(nz, a * 0.25 >= 2.0**-126, True).all(1)
    return ((e_max - e_min <= 12) | ~nz.any(1)) & normal


def test_hadamard_bf16_equals_te_reference_transform(te_reference):
    """The transform itself, element for element, wherever TE's FP32 accumulation is exact (then its
    order cannot matter); elsewhere (cancellation over > 2**12 in one block) TE's last bit depends on its
    matmul's summation order, ours is the correctly rounded value."""
    nv = te_reference.nvfp4
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=False, columnwise=True,
                                 with_rht=True)  # fmt: skip
    checked = total = 0
    for name, x in _tensors(torch.bfloat16).items():
        ours = hadamard(x, 16, torch.tensor(TE_SIGNS)).view(-1, 16)
        theirs = ref_q._apply_rht(x).view(-1, 16)
        assert theirs.dtype == torch.bfloat16
        exact = _fp32_sum_exact(x)
        same = (ours == theirs) | (ours.isnan() & theirs.isnan())
        assert bool(same[exact].all()), f"{name}: {int((~same[exact]).sum())} elements differ"
        checked, total = checked + int(exact.sum()), total + exact.numel()
    assert checked > total // 2, (checked, total)  # 5078 of 8256 blocks here


def test_nan_input_matches_te_reference_inf_input_is_our_documented_difference(te_reference):
    """TE's Python reference propagates NaN like we do (torch.max keeps NaN): the amax is NaN, every block
    scale a NaN code, every FP4 code 0 / every FP8 code NaN. For Inf it follows TE's kernels: S_enc = 1
    (2688 / inf = 0 -> 1), finite scales, Inf saturating; we make the tensor NaN instead, so the loss
    shows it (docs/precision.md, "Non-finite values")."""
    from llmtrain.precision import dequantize

    nv, cs = te_reference.nvfp4, te_reference.current_scaling
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=False)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    x[1, 5] = float("nan")
    ref, q = ref_q.quantize(x), quantize(x, "nvfp4")
    assert torch.equal(q.codes, ref.data) and q.amax.isnan().all() and ref.global_amax_row.isnan().all()
    assert q.scale.float().isnan().all() and ref.scale.float().isnan().all()
    for fmt, te_dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        ref8 = cs.CurrentScalingQuantizerRef(dtype=te_dtype, rowwise=True, columnwise=False).quantize(x)
        assert torch.equal(quantize(x, fmt).codes, ref8.data.view(torch.uint8)), fmt
    x[1, 5] = float("inf")
    ref, q = ref_q.quantize(x), quantize(x, "nvfp4")
    assert torch.isfinite(ref.scale.float()).all() and ref.global_amax_row.isinf().all()
    assert dequantize(q).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
@pytest.mark.parametrize("err_mode,e4m3_max", [("MAE", 448), ("MAE", 256), ("MSE", 256)])
def test_nvfp4_4over6_matches_te_reference(te_reference, dtype, tile, err_mode, e4m3_max):
    """TE 2.20's nvfp4_4over6 (NVFP4QuantizerRef(nvfp4_use_4over6=True)): codes, block scales, amax."""
    from llmtrain.precision.quantize import FourOverSix

    nv = te_reference.nvfp4
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=False,
                                 quant_tile_shape=tile, nvfp4_use_4over6=True, nvfp4_e4m3_max=e4m3_max,
                                 nvfp4_4over6_err_mode=err_mode)  # fmt: skip
    fos = FourOverSix(err_mode, e4m3_max)
    picked4 = 0
    for name, x in _tensors(dtype).items():
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", block_2d=tile == (16, 16), four_over_six=fos)
        assert torch.equal(q.codes, ref.data), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8)), name
        assert torch.equal(q.amax, ref.global_amax_row), name
        if e4m3_max == 448:  # same tensor scale as plain NVFP4: a changed block scale means map-to-4
            plain = quantize(x, "nvfp4", block_2d=tile == (16, 16))
            picked4 += int((q.scale.view(torch.uint8) != plain.scale.view(torch.uint8)).sum())
    assert picked4 > 0 or e4m3_max != 448  # some blocks chose map-to-4: the option is really exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "four_over_six",
    [None, ("MAE", 448), ("MAE", 256), ("MSE", 256)],
    ids=["plain", "4o6-MAE-448", "4o6-MAE-256", "4o6-MSE-256"],
)
def test_nvfp4_row_scaled_matches_te_reference(te_reference, dtype, four_over_six):
    """TE 2.20's row-scaled NVFP4 (NVFP4QuantizerRef(row_scaled_nvfp4=True), the forward activation of
    NVFP4BlockScaling(row_scaled_activation=True)), alone and with 4over6: one FP32 amax per row; codes,
    block scales and the row amaxes agree bit for bit."""
    from llmtrain.precision import dequantize, fake_quantize
    from llmtrain.precision.quantize import FourOverSix

    nv = te_reference.nvfp4
    fos = FourOverSix(*four_over_six) if four_over_six else None
    extra = {}
    if fos is not None:
        extra = dict(nvfp4_use_4over6=True, nvfp4_e4m3_max=fos.e4m3_max, nvfp4_4over6_err_mode=fos.err_mode)
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=False,
                                 row_scaled_nvfp4=True, **extra)  # fmt: skip
    tensors = _tensors(dtype, extra=("row_ranges",))
    differs = 0
    for name, x in tensors.items():
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", four_over_six=fos, row_scaled=True)
        assert q.amax.shape == (x.shape[0],), name
        assert torch.equal(q.codes, ref.data), name
        assert torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8)), name
        assert torch.equal(q.amax, ref.global_amax_row), name
        assert torch.equal(dequantize(q), fake_quantize(x, "nvfp4", four_over_six=fos, row_scaled=True)), name
        per_tensor = quantize(x, "nvfp4", four_over_six=fos)
        differs += int(not torch.equal(q.scale.view(torch.uint8), per_tensor.scale.view(torch.uint8)))
    assert (
        differs >= 3
    )  # per-row amaxes really change block scales (row_ranges, heavy_tail, one_outlier, ...)


@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (50, 40)], ids=str)
@pytest.mark.parametrize("mode", ["4o6-1x16", "4o6-16x16", "row_scaled", "row_scaled-4o6"])
def test_nvfp4_options_on_partial_blocks_match_te_reference(te_reference, shape, mode):
    """Shapes that are not a multiple of the tile (e.g. a 172-row FFN weight): TE's reference zero-pads
    rows and columns to the tile; codes (up to the real width), block scales and amax agree."""
    from llmtrain.precision.quantize import FourOverSix

    nv = te_reference.nvfp4
    tile = (16, 16) if mode == "4o6-16x16" else (1, 16)
    row_scaled, fos = mode.startswith("row_scaled"), FourOverSix("MAE", 256) if "4o6" in mode else None
    extra = dict(nvfp4_use_4over6=True, nvfp4_e4m3_max=256) if fos else {}
    ref_q = nv.NVFP4QuantizerRef(dtype=nv.reference_utils.Fp4Formats.E2M1, rowwise=True, columnwise=False,
                                 quant_tile_shape=tile, row_scaled_nvfp4=row_scaled, **extra)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g) * 3)).to(
            dtype
        )
        ref = ref_q.quantize(x)
        q = quantize(x, "nvfp4", block_2d=tile == (16, 16), four_over_six=fos, row_scaled=row_scaled)
        assert torch.equal(q.codes[:, : shape[1] // 2], ref.data), dtype
        assert torch.equal(q.scale.view(torch.uint8), ref.scale[: shape[0]].view(torch.uint8)), dtype
        assert torch.equal(q.amax, ref.global_amax_row), dtype

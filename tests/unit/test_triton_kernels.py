"""The Triton fake-quantization kernels against the reference quantizers, bit for bit.

On a GPU the kernels run natively; on the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton), which executes the same kernel code with NumPy.
"""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on inf/NaN

from llmtrain.precision import fake_quantize  # noqa: E402
from llmtrain.precision.hadamard import TE_SIGNS  # noqa: E402
from llmtrain.precision.kernel_check import reference  # noqa: E402
from llmtrain.precision.triton_kernels import (  # noqa: E402
    PAIR_TILES,
    Direction,
    fake_quantize_2d,
    fake_quantize_2d_pair,
    one_quantization_serves_both,
)
from tests.precision_cases import adversarial_tensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ["fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4"]


def _inputs(dtype):
    # The adversarial set at interpreter size; `ragged` is a multiple of no tile or block.
    names = ("normal", "heavy_tail", "wide_range", "ragged", "tiny", "zero_blocks", "all_zero", "one_outlier")
    return adversarial_tensors(dtype, rows=32, cols=64, device=DEVICE, seed=3, names=names)


def _reference(x, fmt, axis, block_2d, signs):
    """Round-to-nearest fake_quantize of x's axis layout (RHT first, a ragged axis zero-padded to whole
    blocks and the transform rounded to x's dtype, as TE does), in FP32."""
    return reference(x, fmt, axis, "nearest", block_2d, signs, 0, 8, torch.float32)


def _assert_bitwise(ours, ref, what):
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} differ"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("axis", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rtn_matches_reference_bitwise(fmt, axis, dtype):
    for name, x in _inputs(dtype).items():
        ours = fake_quantize_2d(x, fmt, axis=axis, out_dtype=torch.float32)
        _assert_bitwise(ours, _reference(x, fmt, axis, False, None), f"{fmt} axis={axis} {name}")


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("axis", [1, 0])
def test_2d_blocks_match_reference_and_agree_across_axes(fmt, axis):
    for name, x in _inputs(torch.bfloat16).items():
        ours = fake_quantize_2d(x, fmt, axis=axis, block_2d=True, out_dtype=torch.float32)
        _assert_bitwise(ours, _reference(x, fmt, axis, True, None), f"{fmt} 2d axis={axis} {name}")
        # Square tiles: the row-wise and column-wise operands hold the very same values (W and W^T).
        other = fake_quantize_2d(x, fmt, axis=1 - axis, block_2d=True, out_dtype=torch.float32)
        _assert_bitwise(ours, other, f"{fmt} 2d transpose {name}")


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rht_then_nvfp4_matches_reference(axis, dtype):
    signs = torch.tensor(TE_SIGNS)
    for name, x in _inputs(dtype).items():
        ours = fake_quantize_2d(x, "nvfp4", axis=axis, rht_signs=signs, out_dtype=torch.float32)
        _assert_bitwise(ours, _reference(x, "nvfp4", axis, False, signs), f"rht axis={axis} {name}")


def test_bf16_output_is_the_rounded_fp32_output():
    x = _inputs(torch.bfloat16)["normal"]
    ours = fake_quantize_2d(x, "nvfp4", axis=0)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, fake_quantize_2d(x, "nvfp4", axis=0, out_dtype=torch.float32).bfloat16())


def test_non_finite_inputs_propagate_nan_like_the_reference():
    x = torch.randn(32, 64, device=DEVICE)
    x[1, 5] = float("nan")
    x[7, 40] = float("inf")
    for fmt in FORMATS:
        ours = fake_quantize_2d(x, fmt, out_dtype=torch.float32)
        ref = fake_quantize(x, fmt)
        assert torch.equal(ours.isnan(), ref.isnan()), fmt
        _assert_bitwise(ours, ref, f"{fmt} non-finite")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sr_bits", [8, 24])
def test_stochastic_rounding_matches_reference_bitwise(fmt, sr_bits):
    """Same seed, same Philox bits: the kernel and fake_quantize round every element the same way, for
    both layouts, 2-D tiles and the RHT."""
    signs = torch.tensor(TE_SIGNS)
    for name, x in _inputs(torch.bfloat16).items():
        for axis in (1, 0):
            for block_2d, rht in ((False, False), (True, False), (False, True)):
                if rht and fmt != "nvfp4":
                    continue
                kw = dict(rounding="stochastic", seed=1234 + axis, sr_bits=sr_bits)
                ours = fake_quantize_2d(x, fmt, axis=axis, block_2d=block_2d,
                                        rht_signs=signs if rht else None, out_dtype=torch.float32, **kw)  # fmt: skip
                ref = reference(x, fmt, axis, "stochastic", block_2d, signs if rht else None, 1234 + axis,
                                sr_bits, torch.float32)  # fmt: skip
                what = f"{fmt} sr{sr_bits} axis={axis} 2d={block_2d} rht={rht} {name}"
                _assert_bitwise(ours, ref, what)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp8_e4m3"])
def test_stochastic_rounding_approaches_the_input_and_is_seeded(fmt):
    # Values strictly between grid points: the mean of many SR draws approaches the input, while every
    # single draw lies on one of the two neighbouring RTN grid points.
    torch.manual_seed(0)
    x = (torch.rand(64, 256) * 2 - 1).to(DEVICE)
    draws = torch.stack([fake_quantize_2d(x, fmt, rounding="stochastic", seed=s, out_dtype=torch.float32)
                         for s in range(64)])  # fmt: skip
    rtn = fake_quantize(x, fmt)
    err_sr = (draws.mean(0) - x).abs().mean().item()
    err_rtn = (rtn - x).abs().mean().item()
    # 64 draws shrink the error of one draw by ~8x (8-bit SR's bias, <= 1/256 of a step, is far below);
    # RTN's error does not shrink at all.
    assert err_sr < err_rtn / 3, (err_sr, err_rtn)
    again = fake_quantize_2d(x, fmt, rounding="stochastic", seed=5, out_dtype=torch.float32)
    assert torch.equal(again, draws[5])
    assert not torch.equal(draws[0], draws[1])


def test_argument_errors():
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="fmt='int4'"):
        fake_quantize_2d(x, "int4")
    with pytest.raises(ValueError, match="rounding="):
        fake_quantize_2d(x, "nvfp4", rounding="up")
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize_2d(x.view(2, 2, 32), "nvfp4")
    with pytest.raises(ValueError, match="sr_bits=16"):
        fake_quantize_2d(x, "nvfp4", rounding="stochastic", sr_bits=16)


def _reference_direction(x, d, axis, signs, sr_bits):
    """fake_quantize of x's row-wise (axis 1) or column-wise (axis 0) operand, as a Direction says."""
    rht_signs = signs if d.rht else None
    return reference(x, d.fmt, axis, d.rounding, d.block_2d, rht_signs, d.seed, sr_bits, torch.float32)


PAIRS = {  # (row-wise, column-wise): TE's slots (input, weight, grad_output) and mixed recipes
    "nvfp4_input": (Direction("nvfp4"), Direction("nvfp4", "stochastic", rht=True, seed=11)),
    "nvfp4_weight_2d": (Direction("nvfp4", block_2d=True), Direction("nvfp4", block_2d=True)),
    "nvfp4_grad": (
        Direction("nvfp4", "stochastic", seed=3),
        Direction("nvfp4", "stochastic", rht=True, seed=4),
    ),
    "mxfp8": (Direction("mxfp8"), Direction("mxfp8", "stochastic", seed=5)),
    "mxfp8_2d": (Direction("mxfp8", block_2d=True), Direction("mxfp8", block_2d=True)),
    "fp8_cs": (Direction("fp8_e4m3"), Direction("fp8_e5m2", "stochastic", seed=6)),
    "mixed_row_rht": (Direction("nvfp4", rht=True), Direction("mxfp8")),
    "row_only": (Direction("fp8_e4m3", "stochastic", seed=8), None),
    "col_only": (None, Direction("nvfp4", rht=True)),
    # Column-wise results that equal the row-wise ones (RTN, no RHT: per-tensor or 2-D): computed once.
    "col_only_2d": (None, Direction("nvfp4", block_2d=True)),
    "fp8_rtn_both": (Direction("fp8_e4m3"), Direction("fp8_e4m3", seed=9)),
    "row_1d_col_2d": (Direction("nvfp4"), Direction("nvfp4", block_2d=True)),
}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("sr_bits", [8, 24])
def test_pair_kernel_gives_both_layouts_bit_for_bit(pair, sr_bits):
    """One read, both quantizations: each output equals the reference of its own layout (and so the
    single-layout kernel), whatever the other layout does."""
    row, col = PAIRS[pair]
    signs = torch.tensor(TE_SIGNS)
    for name, x in _inputs(torch.bfloat16).items():
        got_row, got_col = fake_quantize_2d_pair(x, row, col, rht_signs=signs, sr_bits=sr_bits,
                                                 out_dtype=torch.float32)  # fmt: skip
        for d, got, axis in ((row, got_row, 1), (col, got_col, 0)):
            if d is None:
                assert got is None
                continue
            ref = _reference_direction(x, d, axis, signs, sr_bits)
            _assert_bitwise(got, ref, f"{pair} sr{sr_bits} axis={axis} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pair_kernel_across_several_tiles(dtype):
    """A tensor spanning several [TM, TN] tiles of the pair kernel along both axes, ragged at both ends
    (the tests above fit in one tile along the rows): each tile's rows are loaded out of order
    (_warp_rows) and put back; every layout still matches its reference."""
    tm = max(tile[0] for tile, *_ in PAIR_TILES.values())
    tn = max(tile[1] for tile, *_ in PAIR_TILES.values())
    x = torch.randn(2 * tm + 24, 2 * tn + 16, generator=torch.Generator().manual_seed(4))
    x = x.to(dtype).to(DEVICE)
    signs = torch.tensor(TE_SIGNS)
    for pair in ("nvfp4_input", "nvfp4_grad", "nvfp4_weight_2d", "mxfp8", "row_1d_col_2d"):
        row, col = PAIRS[pair]
        got = fake_quantize_2d_pair(x, row, col, rht_signs=signs, out_dtype=torch.float32)
        for d, y, axis in ((row, got[0], 1), (col, got[1], 0)):
            _assert_bitwise(y, _reference_direction(x, d, axis, signs, 8), f"{pair} axis={axis}")


def test_pair_kernel_bf16_outputs_and_argument_errors():
    x = _inputs(torch.bfloat16)["normal"]
    row, col = fake_quantize_2d_pair(x, Direction("nvfp4"), Direction("mxfp8"))
    assert row.dtype == col.dtype == torch.bfloat16 and row.stride() == x.stride()
    assert torch.equal(row, fake_quantize_2d(x, "nvfp4", axis=1))
    assert torch.equal(col, fake_quantize_2d(x, "mxfp8", axis=0))
    assert fake_quantize_2d_pair(x, None, None) == (None, None)
    bufs = torch.empty_like(x), torch.empty_like(x)  # into given buffers (TE's cached weight workspace)
    got = fake_quantize_2d_pair(x, Direction("nvfp4"), Direction("mxfp8"), row_out=bufs[0], col_out=bufs[1])
    assert got[0] is bufs[0] and got[1] is bufs[1] and torch.equal(got[0], row) and torch.equal(got[1], col)
    with pytest.raises(ValueError, match="row_out/col_out"):
        fake_quantize_2d_pair(x, None, Direction("mxfp8"), row_out=bufs[0])
    with pytest.raises(ValueError, match="row_out/col_out"):
        fake_quantize_2d_pair(x, Direction("nvfp4"), None, row_out=bufs[0].t())
    with pytest.raises(ValueError, match="rht=True needs rht_signs"):
        fake_quantize_2d_pair(x, Direction("nvfp4", rht=True), None)
    with pytest.raises(ValueError, match="fmt='int4'"):
        fake_quantize_2d_pair(x, None, Direction("int4"))


def test_one_quantization_serves_both_layouts_exactly_where_the_values_agree():
    """te_custom's one pass stores one buffer for both layouts where this says so: the column-wise result
    must then be the row-wise one value for value (checked), and it must not say so elsewhere."""
    x = _inputs(torch.bfloat16)["normal"]
    cases = {
        (Direction("nvfp4", block_2d=True), Direction("nvfp4", block_2d=True, seed=7)): True,  # 16x16 weights
        (Direction("fp8_e4m3"), Direction("fp8_e4m3")): True,  # per-tensor: elementwise
        (Direction("mxfp8"), Direction("mxfp8")): False,  # 1x32 blocks differ between W and W^T
        (Direction("nvfp4", block_2d=True), Direction("nvfp4", block_2d=True, rounding="stochastic")): False,
        (Direction("nvfp4"), Direction("nvfp4", rht=True)): False,
    }
    signs = torch.tensor(TE_SIGNS)
    for (row, col), expected in cases.items():
        assert one_quantization_serves_both(row, col) is expected, (row, col)
        if expected:
            got_row, got_col = fake_quantize_2d_pair(x, row, col, rht_signs=signs)
            assert torch.equal(got_row, got_col)


@pytest.mark.parametrize(
    "how",
    [
        dict(fmt="nvfp4", axis=1, rounding="stochastic", rht=True),  # row kernel, amax + quantize
        dict(fmt="nvfp4", axis=0, rounding="stochastic", rht=True),  # pair kernel, column-wise
        dict(fmt="nvfp4", axis=1, block_2d=True),  # pair kernel, row-wise 2-D
        dict(fmt="mxfp8", axis=0),  # no tensor amax
        dict(fmt="fp8_e4m3", axis=1, rounding="stochastic"),
    ],
    ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()),
)
def test_repeated_launches_of_one_configuration_stay_bit_exact(how, monkeypatch):
    """On a GPU the second launch of a configuration skips Triton's launch path (triton_launch.launch): new
    data, seeds of other specializations (1, divisible by 16, over 2**31) and a view that is not 16-byte
    aligned must all give the reference's values, the first time (Triton's path) and again (direct)."""
    from llmtrain.precision import triton_launch

    how = dict(how)
    signs = torch.tensor(TE_SIGNS) if how.pop("rht", False) else None
    rounding = how.get("rounding", "nearest")
    base = torch.randn(33 * 64 + 1, device=DEVICE, dtype=torch.bfloat16)
    views = [base[: 32 * 64].view(32, 64), base[1 : 1 + 32 * 64].view(32, 64)]  # aligned, then not

    def every_case():
        for x in views:
            for seed in (1234, 1, 16, 2**31 + 5, 77):
                ours = fake_quantize_2d(x, rht_signs=signs, seed=seed, out_dtype=torch.float32, **how)
                ref = reference(x, how["fmt"], how["axis"], rounding, how.get("block_2d", False), signs, seed,
                                8, torch.float32)  # fmt: skip
                _assert_bitwise(ours, ref, f"{how} seed={seed} aligned={x.data_ptr() % 16 == 0}")

    every_case()
    if DEVICE == "cuda":  # again, counting the launches that go straight to a kept binary: all of them
        direct = []
        for key, (run, *rest) in list(triton_launch._binaries.items()):
            counted = lambda *a, _run=run: direct.append(1) or _run(*a)  # noqa: E731
            monkeypatch.setitem(triton_launch._binaries, key, (counted, *rest))
        every_case()
        assert len(direct) >= 10  # 10 calls, each one or two launches

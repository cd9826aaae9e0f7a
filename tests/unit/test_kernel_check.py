"""The emulated path's once-per-configuration check of the Triton kernels against the torch reference."""

import pytest
import torch

pytest.importorskip("triton")

from llmtrain.errors import UserError
from llmtrain.precision import kernel_check
from llmtrain.precision.hadamard import TE_SIGNS
from llmtrain.precision.triton_kernels import fake_quantize_2d

CASES = [  # (fmt, axis, rounding, block_2d, rht)
    ("nvfp4", 1, "nearest", True, False),
    ("nvfp4", 0, "stochastic", False, True),
    ("mxfp8", 0, "nearest", False, False),
    ("fp8_e4m3", 1, "nearest", False, False),
]


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(kernel_check, "_checked", set())
    monkeypatch.delenv("LLMTRAIN_KERNEL_CHECK", raising=False)


def _run(fmt, axis, rounding, block_2d, rht):
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    kw = dict(axis=axis, rounding=rounding, block_2d=block_2d, rht_signs=torch.tensor(TE_SIGNS) if rht else None,
              seed=7, sr_bits=8)  # fmt: skip
    return x, kw, fake_quantize_2d(x, fmt, out_dtype=x.dtype, **kw)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-axis{c[1]}-{c[2]}" for c in CASES])
def test_a_kernel_that_agrees_passes_once(case):
    x, kw, out = _run(*case)
    kernel_check.check_once(out, x, case[0], **kw)
    assert len(kernel_check._checked) == 1


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-axis{c[1]}-{c[2]}" for c in CASES])
def test_a_kernel_that_disagrees_stops_the_run_in_one_line(case):
    x, kw, out = _run(*case)
    wrong = out.clone()
    wrong.view(-1)[5] = wrong.view(-1)[5] * 2 + 1  # one value off
    with pytest.raises(UserError) as info:
        kernel_check.check_once(wrong, x, case[0], **kw)
    assert "1 of 6144 values" in str(info.value) and "\n" not in str(info.value)
    assert not kernel_check._checked  # not marked as checked: the next call checks again


def test_checked_once_per_configuration_and_can_be_turned_off(monkeypatch):
    x, kw, out = _run(*CASES[0])
    kernel_check.check_once(out, x, "nvfp4", **kw)
    kernel_check.check_once(out * 0, x, "nvfp4", **kw)  # the same configuration is not checked again
    monkeypatch.setenv("LLMTRAIN_KERNEL_CHECK", "0")
    x, kw, out = _run(*CASES[2])
    kernel_check.check_once(out * 0, x, "mxfp8", **kw)  # off: nothing compared

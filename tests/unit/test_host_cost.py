"""scripts/host_cost.py (issue 18): the host time of one emulated quantize call, layer by layer. The timing
needs a GPU (tests/gpu has none of it: it is a benchmark); here, its refusal and its table."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import host_cost  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_in_one_line_without_cuda():
    out = subprocess.run([sys.executable, str(SCRIPTS / "host_cost.py")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: host_cost.py times GPU launches")


def test_an_unknown_precision_is_one_line_naming_the_choices():
    out = subprocess.run([sys.executable, str(SCRIPTS / "host_cost.py"), "--precisions", "nvfp4,nvfp5"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: --precisions nvfp5: no such precision; choose from ")
    assert "mxfp8" in out.stderr


def test_table_keeps_a_failed_rows_error_beside_the_others_times():
    rows = [
        {"precision": "nvfp4", "row": "hybrid", "role": "input", "shape": [4096, 2048], "host_us": 812.4,
         "wall_us": 900.0},
        {"precision": "nvfp4", "row": "kernels", "role": "input", "shape": [4096, 2048],
         "error": "TypeError: no"},
    ]  # fmt: skip
    md = host_cost.markdown(rows, {"nvfp4 input": [{"function": "x.py:1:f", "calls_per_call": 2.0,
                                                    "own_us": 3.25, "cum_us": 4.0}]})  # fmt: skip
    assert "| nvfp4 | input | 4096x2048 | hybrid | 812 | 900 |" in md
    assert "| kernels | failed: TypeError: no | |" in md
    assert "| `x.py:1:f` | 2 | 3.2 | 4.0 |" in md


def test_timed_reports_a_failing_call_instead_of_raising(monkeypatch):
    def boom():
        raise RuntimeError("kernel | launch\nfailed")

    monkeypatch.setattr(host_cost, "_timed", lambda call, n, torch: call())
    row = host_cost.timed(boom, 3)
    assert row == {"error": "RuntimeError: kernel / launch failed"}  # no NaN (strict JSON), no table break


def test_top_functions_are_per_call():
    def leaf():
        return sum(range(50))

    def call():
        leaf()
        leaf()

    top = host_cost.top_functions(call, 10)
    leaf_row = next(r for r in top if r["function"].endswith(":leaf"))
    assert leaf_row["calls_per_call"] == 2  # 20 calls over 10 profiled calls (the warm-up one outside)
    assert 0 < leaf_row["own_us"] <= leaf_row["cum_us"]

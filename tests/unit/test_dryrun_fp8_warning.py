"""dry_run warns where native FP8-CS was measured slower than BF16 (hidden size <= 2048 on an H200)."""

import pytest

from llmtrain.dryrun import dry_run_report, fp8_speed_warning
from tests.megatron_helpers import make_config


@pytest.mark.parametrize(
    "model,precision,engine,backend,warns",
    [
        ("llama3_1b", "fp8_cs", "megatron", "auto", True),
        ("llama3_1b", "fp8_cs", "megatron", "native", True),
        ("tiny", "fp8_cs", "megatron", "auto", True),
        ("llama3_8b", "fp8_cs", "megatron", "auto", False),  # measured faster at hidden 4096
        ("llama3_1b", "bf16", "megatron", "auto", False),
        ("llama3_1b", "fp8_cs", "megatron", "custom", False),  # emulated: a different cost, not this one
        ("llama3_1b", "fp8_cs", "torch", "auto", False),
    ],
)
def test_warning_only_in_the_measured_range(model, precision, engine, backend, warns):
    cfg = make_config(model, precision, "single", {"precision": {"backend": backend}})
    line = fp8_speed_warning(cfg, engine)
    assert (line is not None) == warns
    if warns:
        assert "H200" in line and "precision=bf16" in line


def test_dry_run_report_carries_the_warning():
    cfg = make_config("llama3_1b", "fp8_cs", "single")
    assert dry_run_report(cfg, 1, "megatron").splitlines()[-1].startswith("warning      FP8-CS")
    assert "warning" not in dry_run_report(make_config("llama3_8b", "fp8_cs", "megatron_8b"), 8, "megatron")

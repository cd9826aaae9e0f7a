"""The precision layer's environment switches: 1 / 0 / unset, anything else one error line."""

import pytest

from llmtrain.errors import UserError
from llmtrain.precision import kernel_check
from llmtrain.precision.switches import switch


@pytest.mark.parametrize(
    ("value", "expected"), [(None, True), ("", True), ("1", True), ("0", False), (" 0 ", False)]
)
def test_one_zero_and_unset(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("LLMTRAIN_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("LLMTRAIN_TEST_SWITCH", value)
    assert switch("LLMTRAIN_TEST_SWITCH", default=True) is expected


@pytest.mark.parametrize("value", ["false", "off", "no", "2"])
def test_anything_else_is_one_error_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("LLMTRAIN_TEST_SWITCH", value)
    with pytest.raises(
        UserError, match=f"LLMTRAIN_TEST_SWITCH='{value}': allowed values are 1 \\(on\\) and 0"
    ):
        switch("LLMTRAIN_TEST_SWITCH", default=True)


def test_the_kernel_check_reads_its_switch(monkeypatch):
    monkeypatch.setenv("LLMTRAIN_KERNEL_CHECK", "0")
    assert not kernel_check.enabled()
    monkeypatch.setenv("LLMTRAIN_KERNEL_CHECK", "off")
    with pytest.raises(UserError, match="LLMTRAIN_KERNEL_CHECK"):
        kernel_check.enabled()

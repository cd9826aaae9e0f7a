"""Third-party warnings go to the run's log file and show once on the console; llmtrain's own pass through."""

import types
import warnings

import pytest

from llmtrain.metrics.warning_log import route_third_party_warnings


def fake_module(name: str, filename: str, source: str) -> types.ModuleType:
    """A module whose code really is `name` (its globals' __name__), as an imported library's is."""
    module = types.ModuleType(name)
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


EMIT = "import warnings\ndef emit(msg, category=UserWarning, stacklevel=1):\n    warnings.warn(msg, category, stacklevel)\n"


@pytest.fixture
def modules():
    megatron = fake_module("megatron.core.fake", "/site/megatron/core/fake.py", EMIT)
    ours = fake_module("llmtrain.engines.fake", "/repo/llmtrain/engines/fake.py", EMIT)
    # llmtrain code calling a library that warns with stacklevel=2: the warning names llmtrain's line,
    # but Megatron issued it
    caller = fake_module(
        "llmtrain.engines.fake_caller",
        "/repo/llmtrain/engines/fake_caller.py",
        "def build(lib):\n    lib.emit('GPTModel is deprecated', DeprecationWarning, stacklevel=2)\n",
    )
    return megatron, ours, caller


def test_third_party_to_file_once_on_console_ours_unchanged(tmp_path, modules, monkeypatch, capsys):
    megatron, ours, caller = modules
    passed_on = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: passed_on.append(str(message)))
    log = tmp_path / "train.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every occurrence reaches the hook, as under python -W always
        with route_third_party_warnings(log):
            for _ in range(3):
                megatron.emit("async save is deprecated\nsecond line of detail")
            caller.build(megatron)
            ours.emit("step 3: non-finite loss/gradient; update skipped")
    err = capsys.readouterr().err.splitlines()
    assert passed_on == ["step 3: non-finite loss/gradient; update skipped"]
    assert err == [
        f"warning (megatron.core.fake): async save is deprecated (details in {log})",
        f"warning (megatron.core.fake): GPTModel is deprecated (details in {log})",
    ]
    text = log.read_text()
    assert text.count("UserWarning: async save is deprecated\nsecond line of detail") == 3
    assert "fake_caller.py:2: DeprecationWarning: GPTModel is deprecated" in text
    assert "non-finite" not in text
    # the hook is removed on exit
    assert warnings.showwarning.__name__ == "<lambda>"


def test_other_ranks_write_the_file_only(tmp_path, modules, capsys):
    megatron, _, _ = modules
    log = tmp_path / "train.log"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with route_third_party_warnings(log, rank=3, echo=False):
            megatron.emit("DDP layout differs")
    assert capsys.readouterr().err == ""
    assert log.read_text().startswith(
        "[rank 3] megatron.core.fake: /site/megatron/core/fake.py:3: UserWarning"
    )

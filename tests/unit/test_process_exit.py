"""How a command ends: as sys.exit does unless torch.distributed was used (see llmtrain.process_exit)."""

import pytest

from llmtrain import process_exit


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (75, 75), ("error: bad", 1)])
def test_exit_status_is_what_sys_exit_gives(code, status, capsys):
    assert process_exit.exit_status(code) == status
    assert capsys.readouterr().err == ("error: bad\n" if isinstance(code, str) else "")


def test_without_torch_distributed_it_is_sys_exit(monkeypatch):
    monkeypatch.setattr(process_exit, "used_torch_distributed", lambda: False)
    with pytest.raises(SystemExit) as e:
        process_exit.run_and_exit(lambda: 4)
    assert e.value.code == 4

    def refuses():
        raise SystemExit(2)

    with pytest.raises(SystemExit) as e:
        process_exit.run_and_exit(refuses)
    assert e.value.code == 2

"""One checkpoint format: `train.init_from`, HF export and eval verify a checkpoint as resume does.

A step dir named directly is that checkpoint or one error line; a run dir whose `latest` fails verification
falls back to the newest older checkpoint that passes, with one warning line per skipped one.
"""

import json

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.convert import init_weights_from
from llmtrain.convert.__main__ import main as convert_main
from llmtrain.convert.api import load_state
from llmtrain.convert.io import save_model_file
from llmtrain.errors import CheckpointError
from llmtrain.eval import load_model
from llmtrain.eval import main as eval_main
from llmtrain.models.llama import LlamaModel
from llmtrain.train.checkpoint import CheckpointManager
from tests.helpers import small_llama_spec

SPEC = small_llama_spec()
CONFIG = OmegaConf.to_yaml({"model": {k: getattr(SPEC, k) for k in SPEC.__dataclass_fields__}})


def _model(seed: int) -> LlamaModel:
    model = LlamaModel(SPEC)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


class TorchLikeEngine:
    """Writes what the torch engine writes: model.safetensors + optimizer.pt."""

    def __init__(self, model):
        self.model = model

    def save(self, directory):
        save_model_file(dict(self.model.state_dict()), directory / "model.safetensors")
        torch.save({"state": {}}, directory / "optimizer.pt")


def _run(tmp_path, steps=(2, 4)):
    """A run dir as training leaves it: one checkpoint per step (weights seeded by the step), `latest`."""
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=0, is_main=True)
    dirs = {
        step: mgr.save(
            step, TorchLikeEngine(_model(step)), {"step": step}, {"rng": 1}, 0, CONFIG, {"engine": "torch"}
        )
        for step in steps
    }
    return tmp_path / "run", dirs


def _same_weights(model, seed) -> bool:
    ref = _model(seed).state_dict()
    return all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


CORRUPTIONS = {
    "config.yaml edited": (
        "config.yaml",
        lambda p: p.write_text(p.read_text() + "# edited\n"),
        "checksum mismatch",
    ),
    "optimizer.pt truncated": (
        "optimizer.pt",
        lambda p: p.write_bytes(p.read_bytes()[:10]),
        "checksum mismatch",
    ),
    "trainer.pt deleted": ("trainer.pt", lambda p: p.unlink(), "missing file trainer.pt"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_init_from_export_and_eval_refuse_a_corrupt_step_dir_in_one_line(tmp_path, capsys, case):
    """Files the old readers never hashed (all but the model's) are verified too, before anything loads."""
    name, corrupt, expected = CORRUPTIONS[case]
    _, dirs = _run(tmp_path, steps=(2,))
    step_dir = dirs[2]
    corrupt(step_dir / name)
    model = _model(0)
    for load in (lambda: init_weights_from(str(step_dir), model), lambda: load_state(step_dir)):
        with pytest.raises(
            CheckpointError, match=rf"step_00000002: {expected}.*; restore it, or use another"
        ):
            load()
    assert _same_weights(model, 0)  # nothing copied in
    for cli, args in (
        (convert_main, ["export", str(step_dir), str(tmp_path / "hf")]),
        (eval_main, [str(step_dir)]),
    ):
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("latest", ["truncated", "manifest deleted", "names a missing dir"])
def test_a_run_dir_whose_latest_is_bad_falls_back_to_the_newest_valid_checkpoint(tmp_path, capsys, latest):
    """As resume: init_from, export and eval of a run dir take step 2 when step 4 (`latest`) is bad."""
    run, dirs = _run(tmp_path)
    if latest == "truncated":
        model_file = dirs[4] / "model.safetensors"
        model_file.write_bytes(model_file.read_bytes()[:1000])
    elif latest == "manifest deleted":
        (dirs[4] / "manifest.json").unlink()
    else:
        (run / "checkpoints" / "latest").write_text("step_00000006\n")
        for f in dirs[4].iterdir():
            f.unlink()
        dirs[4].rmdir()
    model = _model(0)
    init_weights_from(str(run), model)
    assert _same_weights(model, 2)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: ") and "step_00000002" in warning and "\n" not in warning, warning
    assert _same_weights(load_model(run), 2)
    _, state, info = load_state(run / "checkpoints")  # the Megatron engine's init_from
    assert info["step_dir"] == dirs[2] and torch.equal(
        state["norm.weight"], _model(2).state_dict()["norm.weight"]
    )
    assert convert_main(["export", str(run), str(tmp_path / "hf")]) == 0
    import safetensors.torch

    exported = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(exported["model.norm.weight"], _model(2).state_dict()["norm.weight"])


def test_a_run_dir_with_every_checkpoint_corrupt_is_one_line(tmp_path, capsys):
    run, dirs = _run(tmp_path)
    for step_dir in dirs.values():
        (step_dir / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(
        CheckpointError, match=r"all 2 checkpoints fail verification \(newest: .*step_00000004"
    ):
        init_weights_from(str(run), _model(0))
    capsys.readouterr()
    assert convert_main(["export", str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 3 and err[-1].startswith("error: ") and "all 2 checkpoints fail verification" in err[-1]
    )
    assert all(line.startswith("warning: skipping checkpoint: ") for line in err[:2]), err


def test_export_no_verify_skips_the_checksums(tmp_path, capsys):
    _, dirs = _run(tmp_path, steps=(2,))
    (dirs[2] / "optimizer.pt").write_bytes(b"x")
    assert convert_main(["export", str(dirs[2]), str(tmp_path / "hf")]) == 2
    assert "checksum mismatch in optimizer.pt" in capsys.readouterr().err
    assert convert_main(["export", str(dirs[2]), str(tmp_path / "hf"), "--no-verify"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_step_dir_without_its_manifest_is_refused_by_name(tmp_path):
    _, dirs = _run(tmp_path, steps=(2,))
    (dirs[2] / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000002: no manifest.json \(an unfinished save"):
        init_weights_from(str(dirs[2]), _model(0))


def _set_manifest(step_dir, **fields):
    path = step_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_checkpoint_from_a_newer_llmtrain_is_neither_skipped_nor_overwritten(tmp_path):
    """Skipping it as corrupt would let resume train from step 2 and then write over step 4."""
    from llmtrain.checkpoint_format import newest_valid

    run, dirs = _run(tmp_path)
    _set_manifest(dirs[4], format_version=99)
    with pytest.raises(CheckpointError, match=r"format_version 99 > 1: written by a newer llmtrain; upgrade"):
        newest_valid(run / "checkpoints")
    with pytest.raises(CheckpointError, match="upgrade llmtrain"):
        init_weights_from(str(run), _model(0))
    assert json.loads((dirs[4] / "manifest.json").read_text())["format_version"] == 99


@pytest.mark.parametrize("damage", ["format_version is text", "latest is not text"])
def test_a_malformed_manifest_or_latest_is_a_bad_checkpoint_not_a_traceback(tmp_path, capsys, damage):
    run, dirs = _run(tmp_path)
    if damage == "format_version is text":
        _set_manifest(dirs[4], format_version="2")
        expected = 2  # step 4 is skipped as invalid
    else:
        (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00bad")
        expected = 4  # as without `latest`: the newest step dir that verifies
    model = _model(0)
    init_weights_from(str(run), model)
    assert _same_weights(model, expected)
    assert convert_main(["export", str(run), str(tmp_path / "hf")]) == 0


def test_a_bare_weights_dir_without_a_manifest_says_how_to_give_it_one(tmp_path):
    """model.safetensors + config.yaml alone were accepted before; now refused with the way out."""
    import shutil

    _, dirs = _run(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        shutil.copy(dirs[2] / name, bare / name)
    with pytest.raises(CheckpointError, match=r"bare has model.safetensors and config.yaml but no manifest"):
        init_weights_from(str(bare), _model(0))
    from llmtrain.checkpoint_format import write_manifest

    write_manifest(bare, 0)  # the fix docs/hf.md gives
    model = _model(0)
    init_weights_from(str(bare), model)
    assert _same_weights(model, 2)


def test_weights_get_the_umask_mode_not_safetensors_0600(tmp_path):
    """Teammates on a shared cluster read checkpoints and exports: 0666 minus the umask, as other files."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        _, dirs = _run(tmp_path)
        assert convert_main(["export", str(dirs[4]), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    for path in (dirs[4] / "model.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path

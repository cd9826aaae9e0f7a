"""Torch-engine model files: `model.safetensors` read tensor by tensor, and model-only checkpoints (import).

The checkpoint layout around them (step dirs, manifest, sha256s, `latest`, atomic dirs, validity) is
llmtrain.checkpoint_format, which training uses too; this module adds the safetensors file of the torch
engine (the family's model state dict under HF names without `model.`; a tied lm_head stored once).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmtrain import checkpoint_format as fmt
from llmtrain.errors import CheckpointError

MODEL_FILE = "model.safetensors"


def safetensors_names(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype string)} from a safetensors header, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the file is corrupt or not safetensors") from e


def iter_safetensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so a large file never sits in memory twice."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names if names is not None else list(f.keys()):
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the file is corrupt or not safetensors") from e


def load_model_state(step_dir: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The full model state dict of a torch-engine step dir (llmtrain names); verify=False where the caller
    verified it already (checkpoint_format.resolve_checkpoint). Any engine's checkpoint:
    llmtrain.convert.load_model_state (this module knows no engine format)."""
    step_dir = Path(step_dir)
    manifest = fmt.verify(step_dir) if verify else fmt.read_manifest(step_dir)
    engine = manifest.get("engine", "torch")
    if engine != "torch":
        raise CheckpointError(
            f"{step_dir} was written by the {engine} engine; read it with llmtrain.convert.load_model_state"
        )
    path = step_dir / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    return dict(iter_safetensors(path))


def save_model_file(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors; tensors that share storage (tied lm_head) must be dropped first."""
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )
    fmt.umask_mode(path)


def write_checkpoint(
    dest: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    step: int = 0,
    engine: str = "torch",
    force: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a model-only llmtrain checkpoint (model.safetensors, config.yaml, manifest.json) atomically.

    `config` is a plain dict (at least {"model": {...}}); `extra_files` maps names inside the checkpoint to
    files or directories to copy in (e.g. the tokenizer).
    """
    dest = Path(dest).expanduser().resolve()
    with fmt.atomic_output_dir(dest, force) as tmp:
        save_model_file(state, tmp / MODEL_FILE)
        write_config_and_files(tmp, config, extra_files)
        fmt.write_manifest(tmp, step, engine)
    return dest


def write_config_and_files(step_dir: Path, config: dict, extra_files: dict[str, Path] | None = None) -> None:
    """config.yaml from a plain dict, plus `extra_files` ({name inside step_dir: file or dir}) copied in."""
    from omegaconf import OmegaConf

    (step_dir / fmt.CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    for name, src in (extra_files or {}).items():
        if Path(src).is_dir():
            shutil.copytree(src, step_dir / name)
        else:
            (step_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, step_dir / name)

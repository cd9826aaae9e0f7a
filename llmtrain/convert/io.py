"""llmtrain checkpoint files: locate a checkpoint, read/write `model.safetensors` + `manifest.json`, atomic dirs.

Checkpoint layout (torch engine; an `import` writes the same without optimizer/trainer state):

    <run_dir>/checkpoints/step_00000060/
        model.safetensors   the family's model state dict (HF names without `model.`; tied lm_head stored once)
        optimizer.pt        optional
        trainer.pt          optional
        config.yaml         the run's resolved config (at least a `model:` section)
        manifest.json       {"format_version": 1, "engine": "torch", "step": 60, "files": {name: sha256}}
    <run_dir>/checkpoints/latest   text file: "step_00000060"

Everything here is pure file handling (no model, no transformers) so the checkpoint manager can reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmtrain.errors import CheckpointError, UserError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
LATEST_FILE = "latest"


def sha256_file(path: str | Path, chunk_size: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_step_dir(path: Path) -> bool:
    """An llmtrain checkpoint step dir (an HF dir also has model.safetensors, but config.json, not config.yaml)."""
    return path.is_dir() and (
        (path / MANIFEST_FILE).is_file() or ((path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file())
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its `checkpoints/` dir (follows `latest`) or a step dir -> the step dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass a run dir, its checkpoints/ or a step dir"
        )
    if is_step_dir(p):
        return p
    if (p / "checkpoints").is_dir() and not (p / LATEST_FILE).is_file():
        p = p / "checkpoints"
    latest = p / LATEST_FILE
    if latest.is_file():
        step = p / latest.read_text().strip()
        if not is_step_dir(step):
            raise CheckpointError(
                f"{latest} points to {step.name}, which is not a checkpoint; fix or delete {latest}"
            )
        return step
    steps = sorted(d for d in p.glob("step_*") if is_step_dir(d)) if p.is_dir() else []
    if steps:
        return steps[-1]
    raise CheckpointError(
        f"no llmtrain checkpoint at {p} (no manifest.json or model.safetensors+config.yaml, no checkpoints/latest); "
        "pass a run dir, its checkpoints/ or a step_* dir"
    )


def read_manifest(step_dir: Path) -> dict:
    path = Path(step_dir) / MANIFEST_FILE
    if not path.is_file():
        # A bare directory with only model.safetensors (+config.yaml) is accepted as a torch checkpoint.
        return {"format_version": FORMAT_VERSION, "engine": "torch", "step": 0, "files": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); the checkpoint is corrupt, use another one"
        ) from e
    if manifest.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {manifest['format_version']} > {FORMAT_VERSION}; upgrade llmtrain"
        )
    return manifest


def verify_files(step_dir: Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check the sha256 of the files the manifest lists (all, or only `names`)."""
    files = manifest.get("files", {})
    for name in names if names is not None else list(files):
        if name not in files:
            continue
        path = Path(step_dir) / name
        if not path.is_file():
            raise CheckpointError(
                f"{path} is listed in the manifest but missing; the checkpoint is incomplete"
            )
        if sha256_file(path) != files[name]:
            raise CheckpointError(
                f"{path} does not match its sha256 in manifest.json; the checkpoint is corrupt"
            )


def read_config(step_dir: Path):
    """The run config stored with the checkpoint (OmegaConf DictConfig)."""
    from omegaconf import OmegaConf

    path = Path(step_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; an llmtrain checkpoint needs the run's config.yaml")
    cfg = OmegaConf.load(path)
    if "model" not in cfg:
        raise CheckpointError(f"{path} has no model: section; the checkpoint is incomplete")
    return cfg


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
    """The full model state dict of a torch-engine checkpoint (llmtrain names). Any engine's checkpoint:
    llmtrain.convert.api.load_model_state (this module knows no engine format)."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    engine = manifest.get("engine", "torch")
    if engine != "torch":
        raise CheckpointError(
            f"{step_dir} was written by the {engine} engine; read it with llmtrain.convert.load_model_state"
        )
    path = step_dir / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    if verify:
        verify_files(step_dir, manifest, [MODEL_FILE])
    return dict(iter_safetensors(path))


def save_model_file(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as safetensors; tensors that share storage (tied lm_head) must be dropped first."""
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )


def write_manifest(step_dir: Path, step: int, engine: str = "torch", extra: dict | None = None) -> dict:
    """Hash every regular file of `step_dir` (except the manifest) into manifest.json."""
    step_dir = Path(step_dir)
    files = {
        p.relative_to(step_dir).as_posix(): sha256_file(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "engine": engine,
        "step": step,
        "files": files,
        **(extra or {}),
    }
    (step_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, force: bool = False, flag: str = "--force") -> Iterator[Path]:
    """Yield a temp dir next to `dest`; on success it is fsynced and renamed to `dest`, on error removed.

    An existing `dest` is an error unless `force`; then it is replaced only once the new one is complete.
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not force:
        raise UserError(f"output {dest} already exists; choose another path or pass {flag} to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    with atomic_output_dir(dest, force) as tmp:
        save_model_file(state, tmp / MODEL_FILE)
        write_config_and_files(tmp, config, extra_files)
        write_manifest(tmp, step, engine)
    return dest


def write_config_and_files(step_dir: Path, config: dict, extra_files: dict[str, Path] | None = None) -> None:
    """config.yaml from a plain dict, plus `extra_files` ({name inside step_dir: file or dir}) copied in."""
    from omegaconf import OmegaConf

    (step_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    for name, src in (extra_files or {}).items():
        if Path(src).is_dir():
            shutil.copytree(src, step_dir / name)
        else:
            (step_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, step_dir / name)

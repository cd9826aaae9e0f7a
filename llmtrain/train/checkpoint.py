"""Atomic, checksummed checkpoints with a `latest` pointer, keep-last-N and corrupt-checkpoint fallback.

Layout: <run>/checkpoints/step_00000060/{model..., optimizer..., trainer.pt, rng_rank*.pt, config.yaml,
manifest.json} and <run>/checkpoints/latest (a text file naming the step dir). A step dir only ever
appears by rename of a fully written, fsynced temp dir, so a crash leaves either the old or the new one.
"""

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from llmtrain.errors import CheckpointError

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(step_dir: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present with its checksum."""
    manifest_path = step_dir / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{step_dir}: no manifest.json (incomplete or not an llmtrain checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for rel, digest in manifest.get("files", {}).items():
        path = step_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{step_dir}: missing file {rel}")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{step_dir}: checksum mismatch in {rel} (corrupt or truncated)")


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int, is_main: bool, barrier=lambda: None):
        self.root, self.keep_last, self.is_main, self.barrier = Path(root), keep_last, is_main, barrier

    # ---- saving -------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        engine,
        trainer_state: dict,
        rank_state: dict,
        rank: int,
        config_yaml: str,
        extra_manifest: dict | None = None,
    ) -> Path:
        """All ranks call this. Returns the final step dir."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a crash during an earlier save of this step
            tmp.mkdir()
        self.barrier()
        engine.save(tmp)
        torch.save(rank_state, tmp / f"rng_rank{rank:05d}.pt")
        self.barrier()
        if self.is_main:
            torch.save(trainer_state, tmp / "trainer.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "files": files,
                **(extra_manifest or {}),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # same step saved again (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic_text(self.root / "latest", final.name + "\n")
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.step_dirs()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------------
    def step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            (p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)),
            key=lambda p: int(STEP_DIR.match(p.name).group(1)),
        )

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that verifies; older ones are tried (with a warning) if `latest` is corrupt."""
        candidates = self.step_dirs()
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in candidates:  # never resume past the pointer: newer dirs can only be stale
                candidates = candidates[: candidates.index(named) + 1]
        for step_dir in reversed(candidates):
            try:
                verify(step_dir)
                return step_dir
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint: {e}; falling back to the previous one", stacklevel=2)
        return None


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run dir, a checkpoints/ dir (follows `latest`) or a step dir -> a verified step dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass a run dir, checkpoints/ dir or step dir"
        )
    if (p / "manifest.json").is_file():
        verify(p)
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = CheckpointManager(root, keep_last=0, is_main=False).latest_valid()
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {p}")
    return found

"""The llmtrain checkpoint format on disk: layout, manifest, checksums, atomic writes, `latest`, validity.

    <run_dir>/checkpoints/step_00000060/
        model.safetensors | megatron/   the engine's files (torch: model + optimizer.pt; Megatron: a dist checkpoint)
        trainer.pt, rng_rank*.pt        training state (absent in a weights-only checkpoint, e.g. an import)
        config.yaml                     the run's resolved config (at least a `model:` section)
        manifest.json                   {"format_version": 1, "engine": ..., "step": 60, "files": {name: sha256}}
    <run_dir>/checkpoints/latest        text file: "step_00000060"

A step dir only ever appears by rename of a fully written, fsynced temp dir, so a crash leaves the old one
or the new one. A checkpoint is valid when its manifest reads and every file it lists has its sha256.
Everything that reads a checkpoint (resume, `train.init_from`, HF export, eval) finds it with
`resolve_checkpoint` / `newest_valid` here, so all verify alike and fail with the same one-line
CheckpointError. Pure file handling: no torch, no engine format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from llmtrain.errors import CheckpointError, UserError
from llmtrain.fsio import writing

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
LATEST_FILE = "latest"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# The end of every "this checkpoint is bad" line: what the user can do about it.
USE_ANOTHER = "restore it, or use another checkpoint (a run dir takes its newest valid one)"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_step_dir(path: Path) -> bool:
    """A checkpoint step dir (complete or not: its manifest is what `verify` checks)."""
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


# ---- manifest and validity ----------------------------------------------------------------------------
def umask_mode(path: Path) -> None:
    """Give `path` the mode a new file gets here (0666 minus the umask): safetensors writes its files 0600,
    which keeps teammates on a shared cluster from reading the weights. The umask is read by creating a
    probe file, as os.umask cannot be read without being set (not thread-safe: async saves run in a
    thread)."""
    path = Path(path)
    probe = path.with_name(f".mode-probe-{os.getpid()}-{path.name}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()
    os.chmod(path, mode)


def write_manifest(
    step_dir: Path, step: int, engine: str | None = "torch", extra: dict | None = None
) -> dict:
    """Hash every regular file of `step_dir` (except the manifest itself) into manifest.json."""
    step_dir = Path(step_dir)
    files = {
        p.relative_to(step_dir).as_posix(): sha256_file(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p != step_dir / MANIFEST_FILE
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        **({"engine": engine} if engine is not None else {}),
        "step": step,
        "files": files,
        **(extra or {}),
    }
    (step_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def invalid(problem: str) -> CheckpointError:
    """A checkpoint that fails verification: the problem, then what to do; `.problem` alone for summaries."""
    error = CheckpointError(f"{problem}; {USE_ANOTHER}")
    error.problem = problem
    return error


class NewerFormatError(CheckpointError):
    """A checkpoint this llmtrain cannot read but must not treat as corrupt: skipping it would let the run
    train from an older one and overwrite it."""


def read_manifest(step_dir: Path) -> dict:
    path = Path(step_dir) / MANIFEST_FILE
    if not path.is_file():
        raise invalid(f"{step_dir}: no manifest.json (an unfinished save, or not an llmtrain checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise invalid(f"{path}: not an llmtrain manifest (no files table)")
    version = manifest.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise invalid(f"{path}: format_version {version!r} is not a whole number")
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{path} has format_version {version} > {FORMAT_VERSION}: written by a newer llmtrain; upgrade "
            "llmtrain (it is neither skipped nor overwritten)"
        )
    return manifest


def verify(step_dir: Path) -> dict:
    """The manifest, once every file it lists is present with its sha256; else a one-line CheckpointError."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    for rel, digest in manifest.get("files", {}).items():
        path = step_dir / rel
        if not path.is_file():
            raise invalid(f"{step_dir}: missing file {rel}, listed in the manifest (an incomplete copy)")
        if sha256_file(path) != digest:
            raise invalid(
                f"{step_dir}: checksum mismatch in {rel} (does not match its sha256 in manifest.json: "
                "corrupt or truncated)"
            )
    return manifest


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


# ---- finding a checkpoint -----------------------------------------------------------------------------
def step_dirs(root: Path) -> list[Path]:
    """The step_* dirs under a checkpoints/ dir, oldest first (valid or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)),
        key=lambda p: int(STEP_DIR.match(p.name).group(1)),
    )


def read_latest(root: Path) -> str | None:
    """The step dir name `latest` holds, None without a `latest` file."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        return pointer.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None  # unreadable: as without `latest`, the newest step dir that verifies is taken


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_valid(
    root: Path, on_skip: Callable[[str], None] = warn_on_stderr, check: bool = True
) -> tuple[Path | None, list[CheckpointError]]:
    """(the newest checkpoint under `root` that verifies, the errors of the newer ones skipped on the way).

    Never past `latest` (newer dirs can only be stale); each skip is also one `on_skip` line. check=False:
    the newest with a readable manifest, its files unhashed."""
    root = Path(root)
    candidates = step_dirs(root)
    named = read_latest(root)
    if named is not None and root / named in candidates:
        candidates = candidates[: candidates.index(root / named) + 1]
    skipped: list[CheckpointError] = []
    for i in range(len(candidates) - 1, -1, -1):
        try:
            verify(candidates[i]) if check else read_manifest(candidates[i])
            return candidates[i], skipped
        except NewerFormatError:
            raise
        except CheckpointError as e:
            skipped.append(e)
            then = f"trying {candidates[i - 1].name}" if i else "no older checkpoint left"
            on_skip(f"skipping checkpoint: {getattr(e, 'problem', e)}; {then}")
    return None, skipped


def resolve_checkpoint(
    path: str | Path, *, check: bool = True, on_skip: Callable[[str], None] = warn_on_stderr
) -> Path:
    """A step dir, a run dir or its checkpoints/ dir -> a verified step dir.

    A step dir named directly is that checkpoint or a one-line error. A run dir / checkpoints/ dir gives the
    checkpoint `latest` names or, if that one fails verification, the newest older one that passes (each
    skipped one is a warning line), as resume does. check=False skips the sha256s (export --no-verify).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass a run dir, its checkpoints/ or a step dir"
        )
    if is_step_dir(p) or STEP_DIR.match(p.name):  # a step dir without a manifest: say so
        verify(p) if check else read_manifest(p)
        return p
    root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).is_dir() and read_latest(p) is None else p
    candidates, named, pointer = step_dirs(root), read_latest(root), root / LATEST_FILE
    if named is not None and root / named not in candidates:
        if not candidates:
            raise CheckpointError(
                f"{pointer} points to {named}, which is not a checkpoint; fix or delete {pointer}"
            )
        on_skip(f"{pointer} points to {named}, which is not a checkpoint; trying {candidates[-1].name}")
    if not candidates:
        if (p / "model.safetensors").is_file() and (p / CONFIG_FILE).is_file():  # accepted before 2026-12-07
            raise CheckpointError(
                f"{p} has model.safetensors and config.yaml but no manifest.json, so it cannot be verified; "
                "give it one (docs/hf.md, train.init_from) or pass a run dir, its checkpoints/ or a step_* dir"
            )
        raise CheckpointError(
            f"no llmtrain checkpoint at {p} (no manifest.json, no checkpoints/latest, no step_* dirs); "
            "pass a run dir, its checkpoints/ or a step_* dir"
        )
    found, skipped = newest_valid(root, on_skip, check)
    if found is None:
        raise CheckpointError(
            f"{root}: all {len(skipped)} checkpoints fail verification (newest: "
            f"{getattr(skipped[0], 'problem', skipped[0])}); repair them, or pass a checkpoint that verifies"
        )
    return found


# ---- writing ------------------------------------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """Every file and directory under `root` (and `root`) on disk before a rename makes them visible."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be fsynced on every platform
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seal(tmp: Path, final: Path, step: int, engine: str | None = None, extra: dict | None = None) -> dict:
    """Turn a fully written temp dir into step dir `final`: manifest (sha256 of every file), fsync, rename
    (replacing a same-step dir saved earlier), then `latest` in final's parent names it. Returns the manifest."""
    manifest = write_manifest(tmp, step, engine, extra)
    fsync_tree(tmp)
    if final.exists():  # same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(final.parent / LATEST_FILE, final.name + "\n")
    fsync_dir(final.parent)
    return manifest


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, force: bool = False, flag: str = "--force") -> Iterator[Path]:
    """Yield a temp dir next to `dest`; on success it is fsynced and renamed to `dest`, on error removed.

    An existing `dest` is an error unless `force`; then it is replaced only once the new one is complete.
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not force:
        raise UserError(f"output {dest} already exists; choose another path or pass {flag} to replace it")
    # A read-only or full file system is one line; the temp dir is gone by then and `dest` untouched.
    with writing(dest, "choose an output directory that is writable and has room", shown=dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                tmp.rename(dest)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

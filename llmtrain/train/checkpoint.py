"""Training-side checkpoints: save all ranks' state atomically, async saves, keep-last-N, free space.

The on-disk format (layout, manifest, sha256s, atomic rename, `latest`, validity) is
llmtrain.checkpoint_format; this module drives the engine's save/load around it. Async saves (`save_async`
+ `poll`) snapshot the state on the training thread and do the same steps in the background, one save at a
time.
"""

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain import checkpoint_format as fmt
from llmtrain.engines.base import PendingWrite
from llmtrain.errors import CheckpointError
from llmtrain.fsio import no_space
from llmtrain.train.background import BackgroundJob


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _gb(n: float) -> str:
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB" if n < 1e11 else f"{n / 1e9:.0f} GB"


@dataclass
class _InFlight:
    """An async save: stage "write" (engine files in the background), then "seal" (manifest, rename)."""

    step: int
    tmp: Path
    final: Path
    extra_manifest: dict | None
    pending: PendingWrite
    job: BackgroundJob
    stage: str = "write"


class CheckpointManager:
    """`agree(flag) -> bool` is True on every rank when `flag` is True on any rank (a collective); with it a
    failure on one rank aborts the save on all of them instead of leaving the others at a barrier."""

    def __init__(self, root: Path, *, keep_last: int, is_main: bool, barrier=lambda: None, agree=None):
        self.root, self.keep_last, self.is_main, self.barrier = Path(root), keep_last, is_main, barrier
        self.agree = agree or (lambda flag: flag)
        self._in_flight: _InFlight | None = None
        self.last_saved: Path | None = None  # the newest checkpoint this manager completed

    # ---- saving -------------------------------------------------------------------------------------
    def _intact(self) -> str:
        name = fmt.read_latest(self.root)
        return f"{name} is intact" if name else "no earlier checkpoint exists"

    def _needed_bytes(self) -> int | None:
        """The size of the newest checkpoint: a new one of the same run is as large (None for the first)."""
        dirs = self.step_dirs()
        return tree_bytes(dirs[-1]) if dirs else None

    def _check_space(self, step: int) -> None:
        needed = self._needed_bytes()
        if needed is None:
            return
        free = shutil.disk_usage(self.root).free
        if free < needed * 1.05:
            raise CheckpointError(
                f"cannot write checkpoint step {step} to {self.root}: not enough space (needs ~{_gb(needed)}, "
                f"{_gb(free)} free); {self._intact()}; free space and rerun the same command"
            )

    def _abort(self, step: int, tmp: Path, error: BaseException | None) -> None:
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, CheckpointError):
            raise error
        if error is None:
            raise CheckpointError(
                f"cannot write checkpoint step {step} to {self.root}: another rank failed (its error line says "
                f"why); {self._intact()}"
            )
        if no_space(error):
            needed = self._needed_bytes()
            free = shutil.disk_usage(self.root).free if self.root.exists() else 0
            need = f"needs ~{_gb(needed)}, " if needed else ""
            raise CheckpointError(
                f"cannot write checkpoint step {step} to {self.root}: no space left ({need}{_gb(free)} free); "
                f"{self._intact()}; free space and rerun the same command"
            ) from None
        first = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot write checkpoint step {step} to {self.root}: {type(error).__name__}: {first}; "
            f"{self._intact()}; fix the cause and rerun the same command"
        ) from None

    def _prepare(self, step: int) -> tuple[Path, Path]:
        """(temp dir, final dir), the temp dir created empty on the main rank; every rank agrees."""
        final = self.root / fmt.step_dir_name(step)
        tmp = self.root / f".tmp_{fmt.step_dir_name(step)}"
        error = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left over from a crash during an earlier save of this step
                self._check_space(step)
                tmp.mkdir()
            except (CheckpointError, OSError) as e:
                error = e
        if self.agree(error is not None):
            self._abort(step, tmp, error)
        self.barrier()
        return tmp, final

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
        """All ranks call this. Returns the final step dir. On any failure (full disk, I/O error) the temp
        dir is removed, the previous checkpoints stay as they were and every rank raises CheckpointError.
        An async save still in flight is completed first."""
        self.wait()
        tmp, final = self._prepare(step)
        error = None
        try:
            engine.save(tmp)
            torch.save(rank_state, tmp / f"rng_rank{rank:05d}.pt")
        except Exception as e:  # any write failure: clean up, say so in one line
            error = e
        if self.agree(error is not None):
            self._abort(step, tmp, error)
        self.barrier()
        if self.is_main:
            try:
                self._write_trainer_files(tmp, trainer_state, config_yaml)
                self._seal(step, tmp, final, extra_manifest)
            except Exception as e:
                error = e
        if self.agree(error is not None):
            self._abort(step, tmp, error)
        self.barrier()
        self.last_saved = final
        return final

    # ---- asynchronous saving ------------------------------------------------------------------------
    def save_async(
        self,
        step: int,
        engine,
        trainer_state: dict,
        rank_state: dict,
        rank: int,
        config_yaml: str,
        extra_manifest: dict | None = None,
    ) -> float:
        """All ranks call this. Snapshots the state now (engine.start_save) and writes it in the
        background; `poll` at each step boundary completes it. Returns the seconds this call waited for
        the previous save (at most one is in flight). Errors before the snapshot raise here, as `save`'s."""
        waited = self.wait()
        tmp, final = self._prepare(step)
        error = None
        try:
            pending = engine.start_save(tmp)
            torch.save(rank_state, tmp / f"rng_rank{rank:05d}.pt")  # tiny: written now
            if self.is_main:
                self._write_trainer_files(tmp, trainer_state, config_yaml)
        except Exception as e:
            error = e
        if self.agree(error is not None):
            self._abort(step, tmp, error)
        job = BackgroundJob(pending.write, f"checkpoint-write-{step}")
        self._in_flight = _InFlight(step, tmp, final, extra_manifest, pending, job)
        return waited

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def poll(self, block: bool = False) -> Path | None:
        """All ranks call this at the same points (it agrees across ranks). Advances the save in flight:
        returns its step dir once it is complete and `latest`, None while it is still being written. A
        failed write raises the same CheckpointError line as a synchronous save, the temp dir removed."""
        f = self._in_flight
        if f is None:
            return None
        if f.stage == "write":
            if block:
                f.job.join()
            if self.agree(f.job.running):
                return None
            error = f.job.error
            if not self.agree(error is not None):
                try:
                    f.pending.finalize()  # e.g. Megatron's metadata: collective, on the training thread
                except Exception as e:
                    error = e
            if self.agree(error is not None):
                self._fail(f, error)
            f.stage = "seal"
            seal = (lambda: self._seal(f.step, f.tmp, f.final, f.extra_manifest)) if self.is_main else None
            f.job = BackgroundJob(seal, f"checkpoint-seal-{f.step}")  # hashes, fsync, rename, latest
        if block:
            f.job.join()
        if self.agree(f.job.running):
            return None
        if self.agree(f.job.error is not None):
            self._fail(f, f.job.error)
        self._in_flight = None
        self.last_saved = f.final
        return f.final

    def wait(self) -> float:
        """Complete the save in flight, if any (all ranks). Returns the seconds spent waiting."""
        if self._in_flight is None:
            return 0.0
        t0 = time.perf_counter()
        self.poll(block=True)
        return time.perf_counter() - t0

    def abandon(self) -> None:
        """This rank alone (no collectives: other ranks may be gone): let the write in flight finish, then
        remove its temp dir. `latest` keeps naming the previous checkpoint."""
        f, self._in_flight = self._in_flight, None
        if f is None:
            return
        f.job.join()
        if self.is_main and f.tmp.exists():
            shutil.rmtree(f.tmp, ignore_errors=True)

    def _fail(self, f: "_InFlight", error: BaseException | None) -> None:
        self._in_flight = None
        f.job.join()
        self._abort(f.step, f.tmp, error)

    def _write_trainer_files(self, tmp: Path, trainer_state: dict, config_yaml: str) -> None:
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)

    def _seal(self, step, tmp, final, extra_manifest) -> None:
        """Manifest, fsync, rename to the step dir, move `latest` (checkpoint_format.seal), prune: main rank."""
        fmt.seal(tmp, final, step, engine=None, extra=extra_manifest)
        self._prune(final)  # after `latest` moved: never deletes the last complete checkpoint

    def _prune(self, written: Path) -> None:
        """Keep the newest `keep_last` checkpoints up to the one just `written`. Newer step dirs are another
        branch's (a run resumed from an older checkpoint) or stale: not this run's to delete. The one just
        written and the one `latest` names are never deleted, whatever the step numbers say."""
        if self.keep_last <= 0:
            return
        named = fmt.read_latest(self.root)
        keep = {written.name, named}
        ours = [d for d in self.step_dirs() if d.name <= written.name]  # step_NNNNNNNN: sorts as the steps
        for old in ours[: -self.keep_last]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------------
    def step_dirs(self) -> list[Path]:
        return fmt.step_dirs(self.root)

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that verifies; older ones are tried (with a warning) if `latest` is corrupt."""
        found, _ = fmt.newest_valid(self.root, lambda line: warnings.warn(line, stacklevel=3))
        return found

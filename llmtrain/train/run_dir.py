"""Where a run trains and what it resumes from, decided before anything in the run dir is written.

`cli.main` calls `plan_run` before Hydra starts (Hydra writes `.hydra/*.yaml` into the run dir as it starts),
so a refused resume, or `train.resume=never` next to an existing run, leaves the old run byte for byte.
Every rank makes the same decision on its own: no rank writes training state (checkpoints/, metrics.jsonl)
before all ranks have met in the process group, so they all see the same directories. A SLURM job marks
the dir it trains in with its job id, so a requeued job (same id) continues its own run.
"""

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmtrain import checkpoint_format as fmt
from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.spec import STRUCTURAL

CONFIG_HEADER = "# llmtrain: resolved config of this run\n"
# The SLURM job that has started training in this dir (written at its first start, so a requeue continues
# the run). Not launch/sbatch.OWNER_FILE, which is written at submit, before the job has trained: a fresh
# job submitted into an old run's dir with train.resume=never must not take that run for its own.
JOB_FILE = ".llmtrain_job"


@dataclass
class RunPlan:
    run_dir: Path
    resume_dir: Path | None
    note: str | None = None  # one line for the log, e.g. why the run moved to <dir>-restartN


def has_training_state(run_dir: Path) -> bool:
    return (run_dir / fmt.CHECKPOINTS_DIR).exists() or (run_dir / "metrics.jsonl").exists()


def training_state_stamp(run_dir: Path) -> tuple:
    """Cheap (no hashing): changes whenever a run in `run_dir` saves a checkpoint or starts its metrics."""
    root = run_dir / fmt.CHECKPOINTS_DIR
    return has_training_state(run_dir), fmt.read_latest(root), tuple(d.name for d in fmt.step_dirs(root))


def job_id() -> str | None:
    """The scheduler's job id; SLURM keeps it across requeues."""
    return os.environ.get("SLURM_JOB_ID") or None


def _owned_by(run_dir: Path, job: str | None) -> bool:
    try:
        return job is not None and (run_dir / JOB_FILE).read_text().strip() == job
    except OSError:
        return False


def check_run_dir_usable(run_dir: Path) -> None:
    """A run dir that is a file, sits under a file, cannot be created, or holds someone else's config.yaml."""
    key = f"hydra.run.dir={run_dir}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{key}: is a file, not a directory; choose another hydra.run.dir")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: {existing} is a file, not a directory; choose another hydra.run.dir")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts)
        if existing == run_dir:  # an existing run dir is not touched, not even by a probe
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied")
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".llmtrain-probe-", dir=existing))
    except OSError as e:
        raise UserError(
            f"{key}: cannot create it in {existing} ({e.strerror}); choose a hydra.run.dir you can write to"
        ) from None
    config = run_dir / "config.yaml"
    if (run_dir / "metrics.jsonl").is_file() and not (
        config.is_file() or (run_dir / fmt.CHECKPOINTS_DIR).exists()
    ):
        # llmtrain writes config.yaml before its first metrics row: these are some other tool's (or a copy's)
        raise UserError(
            f"{key}: {run_dir / 'metrics.jsonl'} exists but no llmtrain config.yaml or checkpoint does; this "
            "run would append to another run's metrics. Choose another hydra.run.dir (or move the file)"
        )
    if config.is_file() and not ((run_dir / ".hydra").is_dir() or has_training_state(run_dir)):
        with open(config) as f:
            ours = f.read(len(CONFIG_HEADER)) == CONFIG_HEADER
        if not ours:
            raise UserError(
                f"{key}: {config} exists and is not an llmtrain run's; it would be replaced. "
                "Choose another hydra.run.dir (or move the file)"
            )


def fresh_run_dir(run_dir: Path) -> tuple[Path, bool]:
    """train.resume=never: (dir, continue_it). The first of run_dir, run_dir-restart1, ... that this SLURM
    job already trains in (continue it), or that holds no training state (start there)."""
    job = job_id()
    for i in range(10_000):
        candidate = run_dir if i == 0 else run_dir.with_name(f"{run_dir.name}-restart{i}")
        if _owned_by(candidate, job):
            return candidate, True
        if not has_training_state(candidate):
            return candidate, False
    raise UserError(f"hydra.run.dir={run_dir}: 10000 restarts exist; choose another hydra.run.dir")


def latest_in_run(run_dir: Path) -> Path | None:
    """The checkpoint to resume in `run_dir`, None when it has none; refuses when all of them are corrupt."""
    root = run_dir / fmt.CHECKPOINTS_DIR
    found = fmt.step_dirs(root)
    if not found:
        return None
    skipped: list[str] = []
    latest, _ = fmt.newest_valid(root, skipped.append)
    if latest is None:
        try:  # the newest of all, also where `latest` names an older one
            fmt.verify(found[-1])
            problem = "unreadable"
        except CheckpointError as e:
            problem = getattr(e, "problem", str(e))
        raise CheckpointError(
            f"{root}: all {len(found)} checkpoints fail verification (newest: {problem}); "
            "nothing was changed. Repair or move them away to resume, or start fresh beside this run with "
            "train.resume=never"
        )
    pointer, named = root / fmt.LATEST_FILE, fmt.read_latest(root)
    if named is None:  # e.g. a crash between the first checkpoint's rename and writing `latest`
        fmt.warn_on_stderr(
            f"{pointer} is missing or unreadable; trying the newest step dir, {found[-1].name}"
        )
    elif root / named not in found:
        fmt.warn_on_stderr(f"{pointer} points to {named}, which is not a checkpoint; trying {found[-1].name}")
    for line in skipped:  # one line each (the full error above says it when none is left)
        fmt.warn_on_stderr(line)
    return latest


def _names(dirs: list[Path]) -> str:
    if len(dirs) <= 4:
        return ", ".join(d.name for d in dirs)
    return f"{dirs[0].name}, {dirs[1].name}, ..., {dirs[-1].name} ({len(dirs)} checkpoints)"


def check_not_a_rewind(step_dir: Path, run_dir: Path) -> None:
    """Refuse resuming a checkpoint of `run_dir` older than a valid newer one there: training on from it in
    the same dir would overwrite and prune the newer ones and move `latest` back, losing that branch."""
    root, real = run_dir / fmt.CHECKPOINTS_DIR, step_dir.resolve()
    if not root.is_dir() or real.parent != root.resolve() or not fmt.STEP_DIR.match(real.name):
        return  # another run dir's checkpoint: resuming it here starts a branch and leaves that one alone
    candidates = fmt.step_dirs(root)
    named = fmt.read_latest(root)
    if named is not None and root / named in candidates:  # dirs past `latest` are stale (as resume sees them)
        candidates = candidates[: candidates.index(root / named) + 1]
    newer = [d for d in candidates if d.name > real.name]  # step_NNNNNNNN: names sort as the steps do
    for d in reversed(newer):  # only the ones newer than the resume point are hashed
        try:
            fmt.verify(d)
        except fmt.NewerFormatError:
            pass  # not corrupt: a newer llmtrain's, as worth keeping as one that verifies
        except CheckpointError:
            continue
        raise CheckpointError(
            f"train.resume={step_dir}: {run_dir} has newer checkpoints ({_names(newer)}) that training on from "
            f"it here would overwrite or prune; branch into a new run dir with hydra.run.dir=NEW_DIR "
            f"train.resume={step_dir}, or move the newer step dirs out of {root} to rewind this run"
        )


def check_resumable(cfg, step_dir: Path, engine: str | None) -> None:
    """Refuse, before loading anything, a checkpoint this config cannot resume (one line with the fix)."""
    if not (step_dir / "trainer.pt").is_file():
        raise CheckpointError(
            f"train.resume: {step_dir} is a weights-only checkpoint (no optimizer or data position); start from "
            f"its weights with train.init_from={step_dir} train.resume=never"
        )
    try:
        manifest = fmt.read_manifest(step_dir)
    except CheckpointError:
        manifest = {}
    written_by = manifest.get("engine")
    if engine and written_by and written_by != engine:
        raise CheckpointError(
            f"train.resume: {step_dir} was written by the {written_by} engine and this run uses {engine}; "
            f"resume with engine={written_by}, or start from its weights with train.init_from={step_dir} "
            "train.resume=never"
        )
    try:
        theirs = (yaml.safe_load((step_dir / "config.yaml").read_text()) or {}).get("model", {})
    except (OSError, yaml.YAMLError):
        return  # verified checkpoints always carry it; the engine's load reports anything else
    for key in STRUCTURAL:
        if key in theirs and cfg.model.get(key) != theirs[key]:
            raise CheckpointError(
                f"train.resume: model.{key}={cfg.model.get(key)} but the checkpoint {step_dir} has {theirs[key]}; "
                f"set model.{key}={theirs[key]} to resume it, or train.resume=never to start a new run"
            )


def resume_point(cfg, run_dir: Path, engine: str | None = None) -> Path | None:
    mode = str(cfg.train.resume)
    if mode == "never":
        return None
    found = latest_in_run(run_dir) if mode == "auto" else fmt.resolve_checkpoint(mode)
    if found is not None:
        check_not_a_rewind(found, run_dir)
        check_resumable(cfg, found, engine)
    return found


def plan_run(cfg, run_dir: Path, engine: str | None = None) -> RunPlan:
    """Validate the run dir and the resume point; touches nothing."""
    run_dir = Path(run_dir)
    check_run_dir_usable(run_dir)
    if str(cfg.train.resume) != "never":
        return RunPlan(run_dir, resume_point(cfg, run_dir, engine))
    chosen, continue_it = fresh_run_dir(run_dir)
    if continue_it:  # a requeued SLURM job: its own earlier incarnation started this run
        latest = latest_in_run(chosen)
        if latest is not None:
            check_resumable(cfg, latest, engine)
        return RunPlan(chosen, latest, f"SLURM job {job_id()} continues its run in {chosen}")
    if chosen != run_dir:
        check_run_dir_usable(chosen)
        return RunPlan(chosen, None, f"train.resume=never: {run_dir} holds a run; starting fresh in {chosen}")
    return RunPlan(chosen, None)


def claim(run_dir: Path) -> None:
    """Mark `run_dir` as this SLURM job's (rank 0, once the plan is final)."""
    if (job := job_id()) is not None:
        (run_dir / JOB_FILE).write_text(job + "\n")

"""After a signal stopped training before train.steps, inside a SLURM job: tell the batch script.

Rank 0 writes one line, `<step> <train.steps> <cluster.requeue_limit> <checkpoint>`, to $LLMTRAIN_STOP_FILE
(set by the job body in slurm/*.sbatch). The batch script, which runs outside any container and has the
SLURM tools, then requeues the job or says why not (cancelled, time limit, requeue limit, already
requeued by SLURM) and ends it with exit status 75 when it did not reach train.steps. The ranks themselves
never call squeue/scontrol, so a container without SLURM tools works. A job that fails (non-zero exit)
never reaches this code, and SLURM does not requeue failed jobs, so real errors are never retried.
"""

import os
from pathlib import Path

from llmtrain.dist import dist_info_from_env


def stopped_step(run_dir: Path) -> tuple[int, Path] | None:
    """The step and directory of checkpoints/latest (just written for the stop), if any."""
    from llmtrain.checkpoint_format import CHECKPOINTS_DIR, read_latest

    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = read_latest(root)
        return (int(name.rsplit("_", 1)[-1]), root / name) if name else None
    except (OSError, ValueError):
        return None


def after_preemption(cfg, run_dir) -> None:
    stop_file = os.environ.get("LLMTRAIN_STOP_FILE")
    if not stop_file or not dist_info_from_env().is_main:
        return
    found = stopped_step(Path(run_dir).resolve())
    if found is not None and found[0] >= cfg.train.steps:
        return  # the run is complete: nothing to requeue
    # Stopped before the first checkpoint (a warning during start-up): the requeued job starts over.
    step, ckpt = found if found is not None else (0, "the start (no checkpoint yet)")
    tmp = Path(f"{stop_file}.tmp")
    tmp.write_text(f"{step} {cfg.train.steps} {cfg.cluster.requeue_limit} {ckpt}\n")
    tmp.replace(stop_file)  # the batch script never reads half a line

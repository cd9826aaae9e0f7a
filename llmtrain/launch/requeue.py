"""After a signal-triggered checkpoint inside a SLURM job: requeue it (rank 0), within cluster.requeue_limit.

Only a warning signal while the job is still RUNNING requeues it. A plain `scancel` or the time limit
itself also end in SIGTERM, but by then slurmctld already shows the job CANCELLED / TIMEOUT / COMPLETING:
requeueing those would undo a user's cancel, so they only get a message. A job that fails (non-zero exit)
never reaches this code, and SLURM does not requeue failed jobs, so real errors are never retried.
"""

import os
import subprocess

from llmtrain.dist import dist_info_from_env


def _say(text: str) -> None:
    print(f"llmtrain: {text}", flush=True)


def job_state(job_id: str) -> str | None:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def after_preemption(cfg, run_dir) -> None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None or not dist_info_from_env().is_main:
        return
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # SLURM's count: requeues and node failures
    limit = cfg.cluster.requeue_limit
    resume_hint = f"resume with the same command and hydra.run.dir={run_dir}"
    if restarts >= limit:
        _say(
            f"not requeueing job {job_id}: it already restarted {restarts} times (cluster.requeue_limit="
            f"{limit}); the checkpoint is in {run_dir}/checkpoints; {resume_hint}"
        )
        return
    state = job_state(job_id)
    if state != "RUNNING":
        _say(
            f"not requeueing job {job_id}: it is {state or 'unknown to squeue'} (cancelled or at its time "
            f"limit, not warned); {resume_hint}"
        )
        return
    _say(
        f"requeueing job {job_id} (restart {restarts + 1} of at most {limit}); it resumes from "
        f"{run_dir}/checkpoints/latest"
    )
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        _say(f"scontrol requeue {job_id} failed: {' '.join(proc.stderr.split())}; {resume_hint}")

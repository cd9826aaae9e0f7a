"""Cluster launch: SLURM submission, preemption handling and requeue (docs/slurm.md)."""

import os
from pathlib import Path

from llmtrain.launch.requeue import after_preemption

__all__ = ["after_preemption", "inside_scheduler_job", "restart_count", "submit"]


def inside_scheduler_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def restart_count() -> int:
    """How often SLURM has restarted this job (requeues, node failures); 0 outside a job."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) if inside_scheduler_job() else 0


def submit(cfg, overrides: list[str]) -> None:
    """Submit this run (one sweep point) as a SLURM batch job; print the job id and log path, and return."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from llmtrain.errors import ConfigError
    from llmtrain.launch import jobs
    from llmtrain.launch.sbatch import submit_run

    if cfg.cluster.type != "slurm":
        raise ConfigError("cluster.type", cfg.cluster.type, "cannot submit to this cluster type", ["slurm"])
    hc = HydraConfig.get()
    sweep_index = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    sub = submit_run(cfg, overrides, Path(hc.runtime.output_dir), sweep_index)
    jobs.record(sub, overrides)
    print(
        f"submitted job {sub.job_id} ({sub.name}) | log {sub.log} | rank logs {sub.rank_logs}/ | "
        f"run dir {sub.run_dir} | status: python -m llmtrain.launch status",
        flush=True,
    )

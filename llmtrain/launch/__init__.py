"""Cluster launch: SLURM submission, preemption handling and requeue (see issue 'SLURM')."""

from llmtrain.errors import ConfigError


def inside_scheduler_job() -> bool:
    import os

    return "SLURM_JOB_ID" in os.environ


def submit(cfg, overrides: list[str]) -> None:
    """Submit this run to the cluster named by cfg.cluster and return (prints job id and log path)."""
    raise ConfigError("cluster", cfg.cluster.type, "not implemented yet", ["local"])


def after_preemption(cfg, run_dir) -> None:
    """Called by the loop after a signal-triggered checkpoint (requeue under SLURM)."""

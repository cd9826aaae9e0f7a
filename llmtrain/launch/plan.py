"""`dry_run=true cluster=slurm`: what would be submitted, without submitting (no SLURM tools needed)."""

import shlex
from pathlib import Path

from llmtrain.launch.sbatch import job_args, job_name, render_script


def plan(cfg, overrides: list[str], run_dir: Path) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep_index = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    run_dir = run_dir.resolve()
    name = job_name(cfg, sweep_index)
    log_dir = run_dir / "logs"
    script = render_script(cfg, name=name, log_dir=log_dir)  # also checks the cluster.* values
    c = cfg.cluster
    ranks = f"{c.nodes} node(s) x {c.gpus_per_node} rank(s)" + (
        " (CPU)" if cfg.train.device == "cpu" else " (1 GPU each)"
    )
    where = ", ".join(f"{k} {getattr(c, k)}" for k in ("partition", "account", "qos") if getattr(c, k))
    args = " ".join(shlex.quote(a) for a in job_args(overrides, run_dir))
    lines = [
        f"dry run: would submit job {name}: {ranks}, time {c.time}{', ' + where if where else ''}, "
        f"requeue up to {c.requeue_limit} times on the warning {c.signal_seconds} s before the limit",
        f"  run dir {run_dir} | log {log_dir}/{name}-<job id>.out",
        f"  sbatch {run_dir}/job.sbatch {args}",
        "  nothing submitted" + ("" if c.preview else " (cluster.preview=true prints the sbatch script)"),
    ]
    if c.preview:
        lines += ["---- job.sbatch (not written) ----", script.rstrip(), "---- end of job.sbatch ----"]
    return "\n".join(lines)

"""`cluster=slurm` inside an allocation without a job step (salloc, or a batch script of your own): start
the ranks under that allocation with srun, at its size, instead of submitting a second job."""

import os
import shutil
import subprocess
from pathlib import Path

from llmtrain.errors import UserError
from llmtrain.launch.sbatch import job_args, job_python


def allocation_ranks(cfg) -> tuple[int, int]:
    """(nodes, ranks): the allocation's task count if it has one, else cluster.gpus_per_node per node."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    tasks = os.environ.get("SLURM_NTASKS")
    return nodes, int(tasks) if tasks else nodes * cfg.cluster.gpus_per_node


def _what(cfg, run_dir: Path) -> str:
    nodes, ranks = allocation_ranks(cfg)
    return (
        f"inside SLURM allocation {os.environ['SLURM_JOB_ID']} (no job step): running {ranks} ranks on "
        f"{nodes} node(s) with srun here, not submitting a job; run dir {run_dir.resolve()}"
    )


def allocation_plan(cfg, run_dir: Path) -> str:
    return f"dry run: {_what(cfg, run_dir)}; nothing started"


def run_in_allocation(cfg, overrides: list[str], run_dir: Path) -> int:
    if shutil.which("srun") is None:
        raise UserError("cluster=slurm inside an allocation needs `srun` on PATH (or use cluster=local)")
    job = os.environ["SLURM_JOB_ID"]
    nodes, ranks = allocation_ranks(cfg)
    run_dir = run_dir.resolve()
    print(f"llmtrain: {_what(cfg, run_dir)}", flush=True)
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
        capture_output=True,
        text=True,
    ).stdout.split()
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_EXPORT_ENV"):
        env.pop(var, None)
    env.setdefault("MASTER_ADDR", hosts[0] if hosts else "localhost")
    env.setdefault("MASTER_PORT", str(20000 + int(job) % 20000))
    srun = ["srun", "--export=ALL", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks={ranks}"]
    if cfg.cluster.cpus_per_task:
        srun.append(f"--cpus-per-task={cfg.cluster.cpus_per_task}")
    rank_cmd = ["bash", "-c", 'trap "" USR1; exec "$@"', "llmtrain", job_python(cfg), "-m", "llmtrain"]
    return subprocess.run([*srun, *rank_cmd, *job_args(overrides, run_dir)], env=env).returncode

"""`cluster=slurm`: write an sbatch script for this run and submit it with `sbatch`.

The script is the `#SBATCH` header made from cfg.cluster plus a copy of slurm/job_body.sh, the file that the
templates slurm/*.sbatch source, so a submitted job and a hand-submitted template run the same shell code.
"""

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
JOB_BODY = REPO / "slurm" / "job_body.sh"
BODY_MARKER = "# ---- llmtrain job body"  # job_body.sh's first line: where a rendered script's body starts
STOPPED_EXIT = 75  # the job body's status for "stopped before train.steps, checkpoint kept" (EX_TEMPFAIL)
OWNER_FILE = ".llmtrain.job"  # in the run dir: the job that owns it (written at submit and job start)


@dataclass
class Submission:
    job_id: str
    name: str
    run_dir: Path
    log: Path
    rank_logs: Path
    script: Path


def job_body(path: Path = JOB_BODY) -> str:
    """The shell code after the #SBATCH header, copied into the job so that it runs as it was submitted."""
    text = path.read_text()
    if not text.startswith(BODY_MARKER):
        raise UserError(f"{path}: does not start with '{BODY_MARKER}'; restore the file from git")
    return text


def _directive(opt: str) -> str:
    """sbatch reads `#SBATCH` lines word by word; a value with spaces needs double quotes."""
    if " " not in opt:
        return opt
    key, _, value = opt.partition("=")
    return f'{key}="{value}"'


def check_cluster(cfg) -> None:
    c = cfg.cluster
    for key in ("nodes", "gpus_per_node", "signal_seconds"):
        if getattr(c, key) < 1:
            raise ConfigError(f"cluster.{key}", getattr(c, key), "must be >= 1")
    if c.requeue_limit < 0:
        raise ConfigError("cluster.requeue_limit", c.requeue_limit, "must be >= 0")
    limit = time_limit_seconds(c.time)
    if limit is not None and c.signal_seconds >= limit:
        raise ConfigError(
            "cluster.signal_seconds",
            c.signal_seconds,
            f"must be below cluster.time={c.time} ({limit} s), or the warning comes at once and the job "
            "only checkpoints and requeues; lower it or raise cluster.time",
        )
    if c.job_name is not None and re.search(r"[\"\n\\]", c.job_name):
        raise ConfigError("cluster.job_name", c.job_name, "must not contain quotes, backslashes or newlines")
    for entry in c.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", str(entry), flags=re.S):
            raise ConfigError("cluster.env", entry, "each entry is NAME=value, e.g. NCCL_DEBUG=WARN")


def job_env(cfg) -> dict[str, str]:
    return dict(str(e).split("=", 1) for e in cfg.cluster.env)


def time_limit_seconds(text: str) -> int | None:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for UNLIMITED."""
    t = str(text).strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    days, _, rest = t.rpartition("-") if "-" in t else ("", "", t)
    parts = rest.split(":")
    try:
        nums = [int(p) for p in parts]
        d = int(days) if days else 0
    except ValueError:
        raise ConfigError("cluster.time", text, "not a SLURM time (e.g. 04:00:00, 1-00:00:00, 90)") from None
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = ([*nums, 0, 0])[:3]
    else:  # M, M:S, H:M:S
        h, m, s = {1: (0, nums[0], 0), 2: (0, *nums), 3: tuple(nums)}.get(len(nums), (None, 0, 0))
        if h is None:
            raise ConfigError("cluster.time", text, "not a SLURM time (e.g. 04:00:00, 1-00:00:00, 90)")
    return ((d * 24 + h) * 60 + m) * 60 + s


def exclusive(cfg) -> bool:
    c = cfg.cluster
    return c.exclusive if c.exclusive is not None else (c.nodes > 1 and cfg.train.device != "cpu")


def sbatch_directives(cfg, *, name: str, log_dir: Path) -> list[str]:
    """The #SBATCH options for cfg.cluster: one task per GPU, or per CPU slot when train.device=cpu."""
    check_cluster(cfg)
    c = cfg.cluster
    opts = [f"--job-name={name}", f"--nodes={c.nodes}", f"--ntasks-per-node={c.gpus_per_node}"]
    if cfg.train.device != "cpu":  # CPU partitions (and CI) have no GPUs to ask for
        opts.append(f"--gpus-per-node={c.gpus_per_node}")
    if c.cpus_per_task:
        opts.append(f"--cpus-per-task={c.cpus_per_task}")
    for key in ("partition", "account", "qos"):
        if getattr(c, key):
            opts.append(f"--{key}={getattr(c, key)}")
    if exclusive(cfg):  # whole nodes: all their CPUs and memory, no neighbour on the NICs
        opts += ["--exclusive", "--mem=0"]
    opts += [
        f"--time={c.time}",
        f"--signal=B:USR1@{c.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={log_dir}/%x-%j.out",
        f"--chdir={Path.cwd()}",
    ]
    return opts + [o if o.startswith("-") else f"--{o}" for o in c.extra_sbatch]


def job_python(cfg) -> str:
    """The job's interpreter: cluster.python, else `python` inside a container, else this interpreter."""
    if cfg.cluster.python:
        return cfg.cluster.python
    return "python" if cfg.cluster.container_image else sys.executable


def render_script(cfg, *, name: str, log_dir: Path) -> str:
    c = cfg.cluster
    lines = ["#!/bin/bash", "# Generated by `python -m llmtrain cluster=slurm` (llmtrain/launch/sbatch.py)."]
    lines += [f"#SBATCH {_directive(opt)}" for opt in sbatch_directives(cfg, name=name, log_dir=log_dir)]
    env = {"LLMTRAIN_PYTHON": job_python(cfg), "LLMTRAIN_LOG_DIR": str(log_dir)}
    if c.container_image:
        env["LLMTRAIN_CONTAINER_IMAGE"] = c.container_image
        if c.container_mounts:
            env["LLMTRAIN_CONTAINER_MOUNTS"] = ",".join(c.container_mounts)
        container_env = list(c.container_env) + [k for k in job_env(cfg) if k not in c.container_env]
        if container_env:  # pyxis keeps the image's value of a variable unless it is named here
            env["LLMTRAIN_CONTAINER_ENV"] = ",".join(container_env)
    if c.cpu_bind:
        env["LLMTRAIN_SRUN_ARGS"] = f"--cpu-bind={c.cpu_bind}"
    env |= job_env(cfg)
    lines += ["", *(f"export {k}={shlex.quote(v)}" for k, v in env.items())]
    if c.setup:
        lines += ["# cluster.setup", *c.setup]
    return "\n".join(lines) + "\n\n" + job_body()


def job_name(cfg, sweep_index: int | None) -> str:
    base = cfg.cluster.job_name or f"llmtrain-{cfg.model.name}"
    return base if sweep_index is None else f"{base}-{sweep_index}"


def _need_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError(
            "cluster=slurm: `sbatch` not found on PATH; submit from a SLURM login node "
            "or run with cluster=local"
        )


# sbatch's words for "no controller to ask" (not a request the partition refuses)
UNREACHABLE = (
    "Unable to contact slurm controller",
    "Could not establish a configuration source",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted or received",
)


def sbatch(script: Path, args: list[str]) -> str:
    """Submit; returns the job id. sbatch's own error (bad partition, time, ...) becomes one line.

    `sbatch --test-only` first: sbatch itself accepts a request no node of the partition can hold
    (more nodes, CPUs or GPUs than it has), and the job would stay pending forever.
    """
    _need_sbatch()
    test = subprocess.run(["sbatch", "--test-only", str(script), *args], capture_output=True, text=True)
    if test.returncode != 0:
        why = " ".join(test.stderr.split()) or f"exit status {test.returncode}"
        if any(s in why for s in UNREACHABLE):
            raise UserError(
                f"cluster=slurm: sbatch cannot reach the SLURM controller ({why}); check that `sinfo` works "
                "here (SLURM_CONF, slurmctld up, the network), or run with cluster=local"
            )
        raise UserError(
            f"cluster=slurm: the partition cannot run this job ({why}); lower cluster.nodes, "
            f"cluster.gpus_per_node or cluster.cpus_per_task, or pick another cluster.partition (`sinfo`)"
        )
    proc = subprocess.run(["sbatch", "--parsable", str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        why = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise UserError(f"cluster=slurm: sbatch refused the job: {why}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def job_args(overrides: list[str], run_dir: Path) -> list[str]:
    return [o for o in overrides if not o.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def _remove_if_only_ours(run_dir: Path, existed: set[str]) -> None:
    """After a refused submission: drop what this command created, and the run dir if Hydra made it now."""
    for name in ("logs", "job.sbatch"):
        if name not in existed:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if all(n == ".hydra" or n.endswith(".log") for n in existed):  # only Hydra's files for this command
        shutil.rmtree(run_dir, ignore_errors=True)


def submit_run(cfg, overrides: list[str], run_dir: Path, sweep_index: int | None) -> Submission:
    """Submit one run; the job trains in run_dir, which stays the same across requeues (exact resume)."""
    from llmtrain.launch.jobs import live_owner

    run_dir = run_dir.resolve()
    check_cluster(cfg)
    if owner := live_owner(run_dir):
        job, state = owner
        raise UserError(
            f"cluster=slurm: run dir {run_dir} belongs to job {job} ({state}), which trains or resumes there; "
            f"wait for it, cancel it (python -m llmtrain.launch cancel {job}) or choose another hydra.run.dir"
        )
    existed = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    log_dir = run_dir / "logs"
    name = job_name(cfg, sweep_index)
    script = run_dir / "job.sbatch"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
        script.write_text(render_script(cfg, name=name, log_dir=log_dir))
        job_id = sbatch(script, job_args(overrides, run_dir))
    except BaseException:
        _remove_if_only_ours(run_dir, existed)
        raise
    (run_dir / OWNER_FILE).write_text(f"{job_id}\n")
    return Submission(
        job_id=job_id,
        name=name,
        run_dir=run_dir,
        log=log_dir / f"{name}-{job_id}.out",
        rank_logs=log_dir / f"{name}-{job_id}",
        script=script,
    )

"""The jobs a user submitted with `cluster=slurm`: a small JSONL file, plus live state from squeue."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from llmtrain.errors import UserError

ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


def jobs_file() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser()
    return Path(os.environ.get("LLMTRAIN_JOBS_FILE", state / "llmtrain" / "jobs.jsonl")).expanduser()


def record(sub, overrides: list[str]) -> None:
    path = jobs_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "job_id": sub.job_id,
        "name": sub.name,
        "run_dir": str(sub.run_dir),
        "log": str(sub.log),
        "rank_logs": str(sub.rank_logs),
        "script": str(sub.script),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "overrides": overrides,
    }
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def load() -> list[dict]:
    path = jobs_file()
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return out


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise UserError(f"`{tool}` not found on PATH; run this on a SLURM login node")


def live_states(job_ids: list[str]) -> dict[str, dict]:
    """{job_id: {state, restarts, elapsed, reason}} for the jobs slurmctld still knows (MinJobAge)."""
    if not job_ids:
        return {}
    _need("squeue")
    fields = "JobID:|,State:|,RestartCnt:|,TimeUsed:|,Reason:|"
    cmd = ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O", fields]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # unknown ids are left out (rc 1 if all)
    states = {}
    for line in proc.stdout.splitlines():
        job, state, restarts, elapsed, reason = (line.split("|") + [""] * 5)[:5]
        states[job.strip()] = {
            "state": state.strip(),
            "restarts": restarts.strip(),
            "elapsed": elapsed.strip(),
            "reason": reason.strip(),
        }
    return states


def progress(run_dir: str) -> str:
    """`step N/M` from the run's metrics.jsonl and config.yaml, or '-' before the first step."""
    metrics = Path(run_dir) / "metrics.jsonl"
    last = None
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                last = json.loads(line).get("step", last)
            except json.JSONDecodeError:
                continue
    if last is None:
        return "-"
    total = "?"
    config = Path(run_dir) / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        total = OmegaConf.load(config).get("train", {}).get("steps", "?")
    return f"step {last}/{total}"


def status(all_jobs: bool = False) -> str:
    entries = load()
    if not entries:
        return f"no jobs submitted with cluster=slurm yet ({jobs_file()})"
    live = live_states([e["job_id"] for e in entries])
    rows = []
    for e in entries:
        s = live.get(e["job_id"], {"state": "GONE", "restarts": "?", "elapsed": "", "reason": ""})
        if not all_jobs and s["state"] == "GONE":
            continue
        state = s["state"] + (f" ({s['reason']})" if s["reason"] not in ("", "None") else "")
        row = (e["job_id"], e["name"], state, s["restarts"], s["elapsed"] or "-")
        rows.append((*row, progress(e["run_dir"]), e["log"]))
    if not rows:
        return "no tracked jobs known to slurmctld any more (--all lists them from the jobs file)"
    head = ("JOB", "NAME", "STATE", "RESTARTS", "TIME", "PROGRESS", "LOG")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [head, *rows]
    )


def cancel(job_ids: list[str], all_active: bool = False) -> str:
    if all_active:
        entries = load()
        live = live_states([e["job_id"] for e in entries])
        job_ids = [e["job_id"] for e in entries if live.get(e["job_id"], {}).get("state") in ACTIVE]
        if not job_ids:
            return "no active jobs to cancel"
    if not job_ids:
        raise UserError("cancel: give job ids or --all (active jobs from `python -m llmtrain.launch status`)")
    _need("scancel")
    proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"scancel {' '.join(job_ids)}: {' '.join(proc.stderr.split())}")
    return f"cancelled {' '.join(job_ids)}"

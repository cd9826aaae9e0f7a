"""The jobs a user submitted with `cluster=slurm`: a small JSONL file, live state from squeue, sacct when
slurmctld has forgotten a job, and each job's own records (`<rank logs>/events`, written by the job body)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmtrain.errors import UserError
from llmtrain.launch.sbatch import OWNER_FILE, STOPPED_EXIT

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


ENTRY_KEYS = ("job_id", "name", "run_dir", "log", "rank_logs")  # what `status` reads of every entry


def record(sub, overrides: list[str]) -> None:
    path = jobs_file()
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:  # the job is submitted already: say what is missing, do not fail the submission
        print(
            f"warning: cannot record job {sub.job_id} in {path} ({e.strerror}); `python -m llmtrain.launch "
            "status` will not list it (point LLMTRAIN_JOBS_FILE at a writable file)",
            file=sys.stderr,
            flush=True,
        )


def _valid(entry) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), str) and entry[k] for k in ENTRY_KEYS)


def load() -> list[dict]:
    """The recorded jobs. Lines that are not an entry `status` can read (cut by a crash mid-write, edited
    by hand) are skipped with one warning line naming them."""
    path = jobs_file()
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(
            f"cannot read the jobs file {path} ({e.strerror}); point LLMTRAIN_JOBS_FILE at a file "
            "(default: $XDG_STATE_HOME/llmtrain/jobs.jsonl)"
        ) from None
    out, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("job_id"), int):
            entry["job_id"] = str(entry["job_id"])
        if _valid(entry):
            out.append(entry)
        else:
            skipped.append(str(number))
    if skipped:
        print(
            f"warning: {path}: skipped line{'s' if len(skipped) > 1 else ''} {', '.join(skipped)} (not a job entry with "
            f"{', '.join(ENTRY_KEYS)}); delete or fix those lines",
            file=sys.stderr,
            flush=True,
        )
    return out


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise UserError(f"`{tool}` not found on PATH; run this on a SLURM login node")


def live_states(job_ids: list[str]) -> dict[str, dict]:
    """{job_id: {state, restarts, reason}} for the jobs slurmctld still knows (MinJobAge)."""
    if not job_ids:
        return {}
    _need("squeue")
    fields = "JobID:|,State:|,RestartCnt:|,Reason:|"
    cmd = ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O", fields]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # unknown ids are left out (rc 1 if all)
    states = {}
    for line in proc.stdout.splitlines():
        job, state, restarts, reason = (line.split("|") + [""] * 4)[:4]
        states[job.strip()] = {"state": state.strip(), "restarts": restarts.strip(), "reason": reason.strip()}
    return states


def accounted_states(job_ids: list[str]) -> dict[str, dict]:
    """{job_id: {state, exit_code}} from sacct; {} where accounting is not configured."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,ExitCode"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {}  # e.g. "Slurm accounting storage is disabled"
    out = {}
    for line in proc.stdout.splitlines():
        job, state, code = ([*line.split("|"), "", ""])[:3]
        out[job] = {"state": state.split()[0] if state else "", "exit_code": code.split(":")[0]}
    return out


def live_owner(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of the pending or running job that owns run_dir, if any."""
    try:
        job = (Path(run_dir) / OWNER_FILE).read_text().strip()
    except OSError:
        return None
    if not job.isdigit() or shutil.which("squeue") is None:
        return None
    state = live_states([job]).get(job, {}).get("state", "")
    return (job, state) if state in ACTIVE else None


def read_events(rank_logs: str) -> list[dict]:
    """The job body's `<epoch> start restart=N` / `<epoch> end rc=N [step=N] [error=...]` lines."""
    path = Path(rank_logs) / "events"
    events = []
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"(\d+) (start|end) ?(.*)$", line)
        if not m:
            continue
        ev = {"t": int(m.group(1)), "kind": m.group(2)}
        rest = m.group(3)
        if "error=" in rest:
            rest, ev["error"] = rest.split("error=", 1)
        ev |= dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
        events.append(ev)
    return events


def elapsed_seconds(events: list[dict], running: bool) -> int:
    """Time trained across all restarts of the job: each start to its end (or to now while running)."""
    total, start = 0, None
    for ev in events:
        if ev["kind"] == "start":
            start = ev["t"]
        elif start is not None:
            total, start = total + ev["t"] - start, None
    if start is not None and running:
        total += int(time.time()) - start
    return total


def _hms(seconds: int) -> str:
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _steps_total(run_dir: str) -> str:
    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        return "?"
    from omegaconf import OmegaConf

    return str(OmegaConf.load(config).get("train", {}).get("steps", "?"))


def _last_step(run_dir: str) -> int | None:
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return None
    for line in reversed(metrics.read_text(encoding="utf-8").splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return None


def _ended_at(entry: dict, last_end: dict | None) -> int | None:
    """The step a job's last run ended at: rank 0's stop record (a signal stopped it; it outlives a batch
    shell that SLURM killed first), else the job body's end record."""
    try:
        return int((Path(entry["run_dir"]) / f".llmtrain.stop.{entry['job_id']}").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return int(last_end["step"]) if last_end and str(last_end.get("step", "")).isdigit() else None


def job_status(entry: dict, live: dict | None, accounted: dict | None) -> dict:
    """Everything `status` shows for one job, from SLURM (squeue, else sacct) and the job's own records."""
    events = read_events(entry["rank_logs"])
    ends = [e for e in events if e["kind"] == "end"]
    last_end = ends[-1] if ends and events[-1]["kind"] == "end" else None
    starts = sum(e["kind"] == "start" for e in events)
    if live:
        state, source = live["state"], "squeue"
    elif accounted:
        state, source = accounted["state"], "sacct"
    elif last_end is not None:  # slurmctld forgot it and no accounting: the job body's own end record
        rc = int(last_end["rc"]) if str(last_end.get("rc", "")).isdigit() else None
        states = {None: "REQUEUED", 0: "COMPLETED", STOPPED_EXIT: "STOPPED"}
        state, source = states.get(rc, "FAILED"), "job records"
    else:
        state, source = ("LOST" if starts else "GONE"), "job records"
    running = state in ("RUNNING", "COMPLETING")
    # Progress of this job: the run dir while it trains there, else where its last run ended.
    step = _last_step(entry["run_dir"]) if running else _ended_at(entry, last_end)
    exit_code = last_end.get("rc") if last_end else (accounted or {}).get("exit_code")
    restarts = live["restarts"] if live and live.get("restarts") else str(max(starts - 1, 0))
    return {
        "job_id": entry["job_id"],
        "name": entry["name"],
        "state": state,
        "reason": reason if (reason := (live or {}).get("reason", "")) != "None" else "",
        "state_from": source,
        "restarts": int(restarts) if str(restarts).isdigit() else restarts,
        "elapsed_s": elapsed_seconds(events, running),
        "step": step,
        "steps": _steps_total(entry["run_dir"]),
        "exit_code": int(exit_code)
        if exit_code not in (None, "") and str(exit_code).lstrip("-").isdigit()
        else None,
        "error": (last_end or {}).get("error") or None,
        "run_dir": entry["run_dir"],
        "log": entry["log"],
    }


def statuses(all_jobs: bool = False, entries: list[dict] | None = None) -> list[dict]:
    entries = load() if entries is None else entries
    ids = [e["job_id"] for e in entries]
    live = live_states(ids)
    gone = [j for j in ids if j not in live]
    accounted = accounted_states(gone) if gone else {}
    out = []
    for e in entries:
        s = job_status(e, live.get(e["job_id"]), accounted.get(e["job_id"]))
        if all_jobs or e["job_id"] in live:
            out.append(s)
    return out


def format_table(rows: list[dict]) -> str:
    head = ("JOB", "NAME", "STATE", "RESTARTS", "TIME", "PROGRESS", "EXIT", "LOG")
    table = []
    for s in rows:
        state = s["state"] + (f" ({s['reason']})" if s["reason"] else "")
        progress = f"step {s['step']}/{s['steps']}" if s["step"] is not None else "-"
        exit_code = "-" if s["exit_code"] is None else str(s["exit_code"])
        table.append(
            (
                s["job_id"],
                s["name"],
                state,
                str(s["restarts"]),
                _hms(s["elapsed_s"]),
                progress,
                exit_code,
                s["log"],
            )
        )
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head) - 1)]
    lines = []
    for r, s in zip([head, *table], [None, *rows]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if s is not None and s["error"]:
            lines.append(f"    {s['error']}")
    return "\n".join(lines)


def status(all_jobs: bool = False, as_json: bool = False) -> str:
    entries = load()
    if not entries:
        return "[]" if as_json else f"no jobs submitted with cluster=slurm yet ({jobs_file()})"
    rows = statuses(all_jobs, entries)
    if as_json:
        return json.dumps(rows, indent=1)
    if not rows:
        return "no tracked jobs known to slurmctld any more (--all lists them from the jobs file)"
    return format_table(rows)


def cancel(job_ids: list[str], all_active: bool = False) -> str:
    if all_active:
        entries = load()
        live = live_states([e["job_id"] for e in entries])
        job_ids = [e["job_id"] for e in entries if live.get(e["job_id"], {}).get("state") in ACTIVE]
        if not job_ids:
            return "no active jobs to cancel"
    if not job_ids:
        raise UserError("cancel: give job ids or --all (active jobs from `python -m llmtrain.launch status`)")
    bad = [j for j in job_ids if not re.fullmatch(r"\d+(_\d+)?", j)]
    if bad:
        raise UserError(
            f"cancel: {' '.join(bad)} is not a SLURM job id (see `python -m llmtrain.launch status`)"
        )
    _need("scancel")
    known = live_states(job_ids)
    unknown = [j for j in job_ids if j not in known]
    if unknown:
        raise UserError(
            f"cancel: no such job {' '.join(unknown)} (slurmctld does not know it; "
            "`python -m llmtrain.launch status --all` lists your jobs); nothing cancelled"
        )
    done = [j for j in job_ids if known[j]["state"] not in ACTIVE]
    todo = [j for j in job_ids if j not in done]
    if todo:
        proc = subprocess.run(["scancel", *todo], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"scancel {' '.join(todo)}: {' '.join(proc.stderr.split())}")
    parts = [f"cancelled {' '.join(todo)}"] if todo else []
    parts += [f"job {j} already ended ({known[j]['state']})" for j in done]
    return "; ".join(parts)

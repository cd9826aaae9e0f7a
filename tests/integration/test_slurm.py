"""End to end against real slurmctld/slurmd (started by .ci/slurm_up.sh; LLMTRAIN_SLURM_TESTS=1 enables).

Every job trains the tiny model on CPU with gloo. Losses are compared bitwise with the template run, so a
submitted, a preempted-and-requeued and a resubmitted run must all continue exactly. Whole module (with
test_slurm_launch.py): 196-229 s on 2 cores shared with other work (load average 3-5).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, cli_env, losses, read_metrics

SLURM_HOME = Path(os.environ.get("LLMTRAIN_SLURM_HOME", "/tmp/llmtrain-slurm"))
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS = 160  # long enough (~25 ms a step) to signal a run in the middle
RUN = [
    *FAST,
    "recipe=tiny",
    "engine=torch",
    "train.device=cpu",
    f"train.steps={STEPS}",
    "train.checkpoint_interval=40",
    "logging.interval=40",
]
SUBMIT = ["cluster=slurm", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1"]
CPU_TEMPLATE = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]  # the node has no GPUs


def slurm_env() -> dict:
    env = cli_env()
    if "SLURM_CONF" not in env and (SLURM_HOME / "slurm.conf").exists():
        env["SLURM_CONF"] = str(SLURM_HOME / "slurm.conf")
    env["LLMTRAIN_PYTHON"] = sys.executable  # the jobs run this interpreter, with the repo on PYTHONPATH
    return env


def slurm_ready() -> bool:
    if os.environ.get("LLMTRAIN_SLURM_TESTS") != "1" or shutil.which("sinfo") is None:
        return False
    try:
        return (
            subprocess.run(["sinfo", "-h"], env=slurm_env(), capture_output=True, timeout=15).returncode == 0
        )
    except subprocess.TimeoutExpired:
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not slurm_ready(), reason="needs LLMTRAIN_SLURM_TESTS=1 and a cluster (.ci/slurm_up.sh)"
    ),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    env = slurm_env()
    env["LLMTRAIN_JOBS_FILE"] = str(tmp_path_factory.mktemp("jobs") / "jobs.jsonl")
    return env


def sh(env, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_info(env, job: str) -> dict:
    text = sh(env, "scontrol", "show", "job", "-o", job).stdout
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def logs_of(run_dir: Path) -> str:
    return "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')}"
        for p in sorted(run_dir.rglob("*.out")) + sorted(run_dir.rglob("rank*.log"))
    )


def wait_for(env, job: str, states: set[str], run_dir: Path, timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info["JobState"] in states:
            return info
        time.sleep(0.25)
    sh(env, "scancel", job, check=False)
    raise AssertionError(f"job {job} still {info['JobState']} after {timeout}s\n{logs_of(run_dir)}")


def wait_done(env, job: str, run_dir: Path, expect: str = "COMPLETED") -> dict:
    info = wait_for(env, job, FINAL, run_dir)
    assert info["JobState"] == expect, f"job {job} ended {info['JobState']}\n{logs_of(run_dir)}"
    return info


def wait_steps(run_dir: Path, at_least: int, timeout: float = 120) -> int:
    """Block until metrics.jsonl reaches `at_least` steps (the ranks are training, handlers installed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        steps = len(path.read_text().splitlines()) if path.exists() else 0
        if steps >= at_least:
            return steps
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {at_least}\n{logs_of(run_dir)}")


def sbatch_template(env, run_dir: Path, *overrides: str, sbatch_opts: tuple[str, ...] = ()) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    job_env = {**env, "LLMTRAIN_LOG_DIR": str(run_dir / "logs")}
    out = sh(
        job_env,
        "sbatch",
        "--parsable",
        f"--output={run_dir}/%x-%j.out",
        *CPU_TEMPLATE,
        *sbatch_opts,
        "slurm/train.sbatch",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ).stdout
    return out.strip().split(";")[0]


def no_slurm_tools_python(
    tmp_path: Path, slow_failing_rank: int | None = None, nan_steps: tuple[int, ...] = ()
) -> Path:
    """The ranks' interpreter, as in a container without SLURM tools: nothing on PATH. With
    slow_failing_rank, that rank takes 5 s to exit after an error, so srun's --kill-on-bad-exit TERMs it
    while it is exiting (the race that made a failed job end 143 instead of its error's status). With
    nan_steps, `-m llmtrain` runs as tests/faults.py with those steps poisoned."""
    script = tmp_path / "python-no-slurm"
    slow = (
        ""
        if slow_failing_rank is None
        else (f"[[ ${{SLURM_PROCID:-0}} == {slow_failing_rank} && $rc != 0 ]] && /bin/sleep 5\n")
    )
    faults = (
        ""
        if not nan_steps
        else (
            f'export PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
            f'[[ "$1 $2" == "-m llmtrain" ]] && shift 2 && '
            f'set -- -m tests.faults --nan-steps={",".join(map(str, nan_steps))} "$@"\n'
        )
    )
    script.write_text(
        f"#!/bin/bash\nexport PATH=/nonexistent\n{faults}"
        'echo "slurm tools on PATH: $(command -v scontrol squeue srun || echo none)"\n'
        f'"{sys.executable}" "$@"\nrc=$?\n{slow}exit $rc\n'
    )
    script.chmod(0o755)
    return script


def status_of(env, job: str) -> dict:
    rows = json.loads(sh(env, sys.executable, "-m", "llmtrain.launch", "status", "--all", "--json").stdout)
    return next(r for r in rows if r["job_id"] == job)


def job_log(run_dir: Path, job: str, name: str = "llmtrain-tiny") -> str:
    return (run_dir / "logs" / f"{name}-{job}.out").read_text(errors="replace")


def submit(env, *args: str) -> tuple[list[str], str]:
    proc = sh(env, sys.executable, "-m", "llmtrain", *args)
    jobs = re.findall(r"submitted job (\d+) ", proc.stdout)
    assert jobs, proc.stdout + proc.stderr
    return jobs, proc.stdout


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    """The template run, uninterrupted: the losses every other run must reproduce bitwise."""
    run_dir = tmp_path_factory.mktemp("template")
    job = sbatch_template(env, run_dir, *RUN)
    wait_done(env, job, run_dir)
    return run_dir


def test_template_runs_tiny_on_two_ranks(reference):
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    rank_logs = sorted(p.name for p in (reference / "logs").glob("*/rank*.log"))
    assert rank_logs == ["rank0.log", "rank1.log"]
    rank0 = next((reference / "logs").glob("*/rank0.log")).read_text()
    assert "dp=2" in rank0 and f"done: step {STEPS}" in rank0
    assert (reference / "checkpoints" / "latest").exists()


def test_cluster_slurm_submits_and_reproduces_the_template_run(env, reference, tmp_path):
    run_dir = tmp_path / "run"
    (job,), out = submit(env, *RUN, *SUBMIT, f"hydra.run.dir={run_dir}")
    assert f"log {run_dir}/logs/llmtrain-tiny-{job}.out" in out
    wait_done(env, job, run_dir)
    assert losses(run_dir) == losses(reference)
    status = sh(env, sys.executable, "-m", "llmtrain.launch", "status").stdout
    assert re.search(
        rf"^{job}\s+llmtrain-tiny\s+COMPLETED\s+0\s+\S+\s+step {STEPS}/{STEPS}\s+0\s", status, re.M
    ), status


def test_sweep_submits_one_job_per_point(env, tmp_path):
    """Also a site with SBATCH_EXPORT=NONE (the job starts without the submitting shell's environment),
    a job name with a space, and the cluster.setup / cluster.env keys."""
    sweep = tmp_path / "sweep"
    jobs, _ = submit(
        {**env, "SBATCH_EXPORT": "NONE"},
        "-m",
        *RUN,
        "train.steps=8",
        "cluster=slurm",
        "cluster.gpus_per_node=1",
        "cluster.cpus_per_task=1",
        "cluster.job_name=my sweep",
        "cluster.env=['NCCL_DEBUG=WARN']",
        "cluster.setup=['echo setup ran with NCCL_DEBUG=$NCCL_DEBUG']",
        "train.seed=1,2",
        f"hydra.sweep.dir={sweep}",
    )
    assert len(jobs) == 2
    for i, job in enumerate(jobs):
        wait_done(env, job, sweep / str(i))
        assert sh(env, "squeue", "-h", "-t", "all", "-j", job, "-o", "%j").stdout.strip() == f"my sweep-{i}"
        assert len(read_metrics(sweep / str(i))) == 8
        assert "setup ran with NCCL_DEBUG=WARN" in job_log(sweep / str(i), job, f"my sweep-{i}")
    assert losses(sweep / "0") != losses(sweep / "1")  # each point ran its own seed


def release(env, job: str) -> None:
    """Start a requeued job now instead of after SLURM's ~2 min requeue delay (BeginTime). Not at once:
    slurmd refuses a launch whose credential is not newer than the job's revocation at the requeue, in
    whole seconds ("Killing non-startable batch JobId=J: Job credential revoked", FAILED 1:0)."""
    time.sleep(2)
    deadline = time.monotonic() + 30
    while sh(env, "sinfo", "-h", "-N", "-o", "%T").stdout.strip() != "idle" and time.monotonic() < deadline:
        time.sleep(0.25)
    sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")


def warn(env, job: str) -> None:
    """The time-limit warning, sent now: USR1 to the batch script only, as --signal=B:USR1@N does."""
    sh(env, "scancel", "--batch", "--signal=USR1", job)


def wait_log(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: no '{text}' after {timeout}s")


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(env, reference, tmp_path):
    """Warning during startup -> the ranks stop (before step 1, as the CLI acknowledges it from its start,
    or after the first steps with a checkpoint) -> requeue -> start over or resume; a second warning
    mid-run hits requeue_limit=1, so the job stops (FAILED, exit 75: it did not reach train.steps);
    resubmitting the same command finishes the run. The losses equal the uninterrupted run's bitwise.
    The ranks have no SLURM tools on PATH (a container): the batch script does the requeue."""
    run_dir = tmp_path / "run"
    python = no_slurm_tools_python(tmp_path)
    cmd = [*RUN, *SUBMIT, "cluster.requeue_limit=1", f"cluster.python={python}", f"hydra.run.dir={run_dir}"]
    (job,), _ = submit(env, *cmd)
    # As soon as the batch script runs (its trap is set), before srun and Python are up: the warning
    # must neither kill the starting ranks nor get lost.
    wait_log(run_dir / "logs" / f"llmtrain-tiny-{job}.out", f"llmtrain: job {job} restart 0")
    warn(env, job)
    wait_for(env, job, {"PENDING"}, run_dir, timeout=90)
    release(env, job)
    wait_for(env, job, {"RUNNING"}, run_dir, timeout=60)
    stopped_at = len(read_metrics(run_dir))
    assert 0 <= stopped_at < STEPS
    wait_steps(run_dir, stopped_at + 5)  # resumed and training (the file was cut back to the checkpoint)
    warn(env, job)
    info = wait_done(env, job, run_dir, expect="FAILED")
    assert (info["Restarts"], info["ExitCode"]) == ("1", "75:0")
    log = logs_of(run_dir)
    assert "slurm tools on PATH: none" in log
    assert f"requeueing job {job} (restart 1 of at most 1) at step {stopped_at} of {STEPS}" in log
    if stopped_at:
        assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d}" in log
    else:  # stopped during start-up: nothing to save, the requeued job starts over
        assert "it resumes from the start (no checkpoint yet)" in log
    assert f"not requeueing job {job}: it already restarted 1 times (cluster.requeue_limit=1)" in log
    first_end = len(read_metrics(run_dir))
    assert stopped_at + 5 <= first_end < STEPS
    time.sleep(1)
    assert job_info(env, job)["JobState"] == "FAILED"  # stays stopped

    (job2,), _ = submit(env, *cmd)  # what the message says to do
    wait_done(env, job2, run_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(reference)
    # status: each job's own progress, restarts and exit code, not the run dir's latest
    first, second = status_of(env, job), status_of(env, job2)
    assert (first["state"], first["restarts"], first["step"], first["exit_code"]) == (
        "FAILED",
        1,
        first_end,
        75,
    )
    assert (second["state"], second["restarts"], second["step"], second["exit_code"]) == (
        "COMPLETED",
        0,
        STEPS,
        0,
    )
    assert first["elapsed_s"] >= 1 and first["steps"] == str(STEPS)


def test_job_failing_mid_training_is_not_requeued(env, tmp_path):
    """A real error after training started (the loss diverges at step 50, after the step-40 checkpoint):
    exit status 3, the job ends FAILED once and stays so, although it was submitted with --requeue. Rank 1
    is slow to exit, so srun's --kill-on-bad-exit TERMs it while it exits: the job must still end 3:0 with
    the error in the job log."""
    run_dir = tmp_path / "run"
    python = no_slurm_tools_python(tmp_path, slow_failing_rank=1, nan_steps=(50, 51))
    (job,), _ = submit(
        env, *RUN, *SUBMIT, "train.nan.max_skips=1", f"cluster.python={python}", f"hydra.run.dir={run_dir}"
    )
    info = wait_done(env, job, run_dir, expect="FAILED")
    assert info["ExitCode"] == "3:0" and info["Restarts"] == "0"
    error = "error: training diverged: 2 non-finite steps (train.nan.max_skips=1)"
    assert f"error: job {job} failed with exit status 3; rank 0: {error}" in job_log(run_dir, job)
    log = logs_of(run_dir)
    assert "requeueing" not in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    time.sleep(2)
    info = job_info(env, job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0")
    s = status_of(env, job)
    assert (s["exit_code"], s["step"]) == (3, 51) and s["error"].startswith(error), s


def test_cancel_mid_training_checkpoints_and_is_not_requeued(env, tmp_path):
    """`python -m llmtrain.launch cancel --all` while the ranks train: the SIGTERM from scancel makes them
    checkpoint the step they are at; the job is not requeued (a cancel must stay a cancel)."""
    run_dir = tmp_path / "run"
    (job,), _ = submit(env, *RUN, *SUBMIT, f"hydra.run.dir={run_dir}")
    wait_steps(run_dir, 3)
    out = sh(env, sys.executable, "-m", "llmtrain.launch", "cancel", "--all").stdout
    assert job in out.split()
    info = wait_for(env, job, FINAL, run_dir, timeout=60)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0")
    wait_log(run_dir / "logs" / f"llmtrain-tiny-{job}.out", "(cancelled or at its time limit)")
    log = logs_of(run_dir)
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 3 <= step < STEPS and stopped.group(2).endswith(f"step_{step:08d}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert re.search(
        rf"job {job} is (COMPLETING|CANCELLED) \(cancelled or at its time limit\): the ranks", log
    )
    assert "requeue" not in job_log(run_dir, job)
    assert "no active jobs" in sh(env, sys.executable, "-m", "llmtrain.launch", "cancel", "--all").stdout
    s = status_of(env, job)
    events = (run_dir / "logs" / f"llmtrain-tiny-{job}" / "events").read_text()
    print(f"{s}\n--- events\n{events}\n{logs_of(run_dir)}")  # in full on failure (pytest cuts the message)
    assert (s["state"], s["step"], s["exit_code"]) == ("CANCELLED", step, 75)
    unknown = sh(env, sys.executable, "-m", "llmtrain.launch", "cancel", "99999", check=False)
    assert unknown.returncode == 2 and "no such job 99999" in unknown.stderr


def test_one_job_per_run_dir(env, tmp_path):
    """A second submission to a run dir whose job is running or requeued is refused in one line; a job
    that gets there anyway (a template, by hand) stops without training (exit 16); after `scontrol
    requeue` the log says SLURM requeued the job, which then resumes its own run."""
    run_dir = tmp_path / "run"
    cmd = [*RUN, "train.steps=2000", *SUBMIT, "cluster.gpus_per_node=1", f"hydra.run.dir={run_dir}"]
    (job,), _ = submit(env, *cmd)
    wait_steps(run_dir, 3)

    again = sh(env, sys.executable, "-m", "llmtrain", *cmd, check=False)
    assert again.returncode == 2 and "submitted job" not in again.stdout
    assert again.stderr.strip().splitlines() == [
        f"error: cluster=slurm: run dir {run_dir} belongs to job {job} (RUNNING), which trains or resumes "
        f"there; wait for it, cancel it (python -m llmtrain.launch cancel {job}) or choose another hydra.run.dir"
    ]
    other = sbatch_template(
        env, run_dir, *RUN, sbatch_opts=("--ntasks-per-node=1",)
    )  # bypasses the submit-side check
    info = wait_done(env, other, run_dir, expect="FAILED")
    assert info["ExitCode"] == "16:0"
    assert f"error: run dir {run_dir} is in use by job {job}" in logs_of(run_dir)
    assert job_info(env, job)["JobState"] == "RUNNING"

    sh(env, "scontrol", "requeue", job)  # what a node failure or a requeueing preemption also does
    wait_for(env, job, {"PENDING"}, run_dir, timeout=60)
    stopped_at = len(read_metrics(run_dir))
    wait_log(run_dir / "logs" / f"llmtrain-tiny-{job}.out", f"job {job} was requeued by SLURM")
    assert "resume with the same command" not in job_log(run_dir, job)
    refused = sh(env, sys.executable, "-m", "llmtrain", *cmd, check=False)
    assert refused.returncode == 2 and f"belongs to job {job} (PENDING)" in refused.stderr
    release(env, job)
    wait_steps(run_dir, stopped_at + 3)
    wait_log(
        run_dir / "logs" / f"llmtrain-tiny-{job}" / "rank0.log", f"resumed from {run_dir}/checkpoints/step_"
    )
    sh(env, "scancel", job)
    wait_for(env, job, FINAL, run_dir, timeout=60)
    assert status_of(env, job)["restarts"] == 1


def test_inside_salloc_runs_the_ranks_under_the_allocation(env, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["salloc", "-N1", "-n2", "--cpus-per-task=1", sys.executable, "-m", "llmtrain"]
    proc = sh(env, *cmd, *RUN, "train.steps=8", "cluster=slurm", f"hydra.run.dir={run_dir}")
    assert re.search(
        r"llmtrain: inside SLURM allocation \d+ \(no job step\): running 2 ranks on 1 node\(s\) with srun here, "
        rf"not submitting a job; run dir {run_dir}",
        proc.stdout,
    ), proc.stdout + proc.stderr
    assert "submitted job" not in proc.stdout and "dp=2" in proc.stdout
    assert len(read_metrics(run_dir)) == 8


def test_impossible_or_dry_run_submissions_submit_nothing(env, tmp_path):
    before = sh(env, "squeue", "-h", "-t", "all", "-o", "%i").stdout.split()
    run_dir = tmp_path / "too-big"
    too_big = sh(
        env,
        sys.executable,
        "-m",
        "llmtrain",
        *RUN,
        *SUBMIT,
        "cluster.cpus_per_task=2",
        f"hydra.run.dir={run_dir}",
        check=False,
    )  # 2 ranks x 2 CPUs on a 2-CPU node
    assert too_big.returncode == 2 and len(too_big.stderr.strip().splitlines()) == 1, too_big.stderr
    assert "error: cluster=slurm: the partition cannot run this job" in too_big.stderr
    assert not run_dir.exists()  # a refused submission leaves no run dir behind
    dry = sh(
        env,
        sys.executable,
        "-m",
        "llmtrain",
        *RUN,
        *SUBMIT,
        "dry_run=true",
        "cluster.preview=true",
        f"hydra.run.dir={tmp_path / 'dry'}",
    )
    assert "dry run: would submit job llmtrain-tiny: 1 node(s) x 2 rank(s) (CPU)" in dry.stdout
    assert "nothing submitted" in dry.stdout and "#SBATCH --ntasks-per-node=2" in dry.stdout
    assert sh(env, "squeue", "-h", "-t", "all", "-o", "%i").stdout.split() == before

"""End to end against real slurmctld/slurmd (started by .ci/slurm_up.sh; LLMTRAIN_SLURM_TESTS=1 enables).

Every job trains the tiny model on CPU with gloo. Losses are compared bitwise with the template run, so a
submitted, a preempted-and-requeued and a resubmitted run must all continue exactly. Whole module (with
test_slurm_launch.py): 118-150 s on 2 cores while another job kept one core busy.
"""

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


def sbatch_template(env, run_dir: Path, *overrides: str) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    job_env = {**env, "LLMTRAIN_LOG_DIR": str(run_dir / "logs")}
    out = sh(
        job_env,
        "sbatch",
        "--parsable",
        f"--output={run_dir}/%x-%j.out",
        *CPU_TEMPLATE,
        "slurm/train.sbatch",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ).stdout
    return out.strip().split(";")[0]


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
    assert re.search(rf"^{job}\s+llmtrain-tiny\s+COMPLETED\s+0\s+\S+\s+step {STEPS}/{STEPS}", status, re.M), (
        status
    )


def test_sweep_submits_one_job_per_point(env, tmp_path):
    sweep = tmp_path / "sweep"
    jobs, _ = submit(
        env,
        "-m",
        *RUN,
        "train.steps=8",
        "cluster=slurm",
        "cluster.gpus_per_node=1",
        "cluster.cpus_per_task=1",
        "train.seed=1,2",
        f"hydra.sweep.dir={sweep}",
    )
    assert len(jobs) == 2
    for i, job in enumerate(jobs):
        wait_done(env, job, sweep / str(i))
        assert job_info(env, job)["JobName"] == f"llmtrain-tiny-{i}"
        assert len(read_metrics(sweep / str(i))) == 8
    assert losses(sweep / "0") != losses(sweep / "1")  # each point ran its own seed


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
    """Warning during startup -> checkpoint at the first steps -> requeue -> resume; a second warning
    mid-run hits requeue_limit=1, so the job stops; resubmitting the same command finishes the run.
    The losses equal the uninterrupted run's bitwise."""
    run_dir = tmp_path / "run"
    cmd = [*RUN, *SUBMIT, "cluster.requeue_limit=1", f"hydra.run.dir={run_dir}"]
    (job,), _ = submit(env, *cmd)
    # As soon as the batch script runs (its trap is set), before srun and Python are up: the warning
    # must neither kill the starting ranks nor get lost.
    wait_log(run_dir / "logs" / f"llmtrain-tiny-{job}.out", f"llmtrain: job {job} restart 0")
    warn(env, job)
    # scontrol requeue holds the job ~2 min (BeginTime); release it as soon as it is pending again
    wait_for(env, job, {"PENDING"}, run_dir, timeout=90)
    sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_for(env, job, {"RUNNING"}, run_dir, timeout=60)
    stopped_at = len(read_metrics(run_dir))
    assert 1 <= stopped_at < STEPS
    wait_steps(run_dir, stopped_at + 5)  # resumed and training (the file was cut back to the checkpoint)
    warn(env, job)
    info = wait_done(env, job, run_dir)
    assert info["Restarts"] == "1"
    log = logs_of(run_dir)
    assert f"requeueing job {job} (restart 1 of at most 1)" in log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d}" in log
    assert f"not requeueing job {job}: it already restarted 1 times (cluster.requeue_limit=1)" in log
    assert stopped_at + 5 <= len(read_metrics(run_dir)) < STEPS
    time.sleep(1)
    assert job_info(env, job)["JobState"] == "COMPLETED"  # stays stopped

    (job2,), _ = submit(env, *cmd)  # what the message says to do
    wait_done(env, job2, run_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(reference)


def test_job_failing_mid_training_is_not_requeued(env, tmp_path):
    """A real error after training started (the loss diverges at step 50, after the step-40 checkpoint):
    exit status 3, the job ends FAILED once and stays so, although it was submitted with --requeue."""
    run_dir = tmp_path / "run"
    nan = ["train.inject_nan_steps=[50,51]", "train.nan.max_skips=1"]
    (job,), _ = submit(env, *RUN, *SUBMIT, *nan, f"hydra.run.dir={run_dir}")
    info = wait_done(env, job, run_dir, expect="FAILED")
    assert info["ExitCode"] == "3:0" and info["Restarts"] == "0"
    log = logs_of(run_dir)
    assert "error: training diverged: 2 non-finite steps (train.nan.max_skips=1)" in log
    assert "requeueing" not in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    time.sleep(2)
    info = job_info(env, job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0")


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
    wait_log(run_dir / "logs" / f"llmtrain-tiny-{job}" / "rank0.log", "not requeueing job")
    log = logs_of(run_dir)
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+)", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 3 <= step < STEPS and stopped.group(2).endswith(f"step_{step:08d}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert f"not requeueing job {job}: it is " in log
    assert "no active jobs" in sh(env, sys.executable, "-m", "llmtrain.launch", "cancel", "--all").stdout

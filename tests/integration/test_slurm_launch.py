"""SLURM launch pieces that need no daemons: templates, generated scripts, the requeue decision.

The end-to-end tests against real slurmctld/slurmd are in test_slurm.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.errors import ConfigError
from llmtrain.launch import after_preemption
from llmtrain.launch.sbatch import BODY_MARKER, JOB_BODY, REPO, render_script, time_limit_seconds
from tests.helpers import cli_env, compose_config

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))


def test_templates_source_the_one_job_body_and_parse():
    assert len(TEMPLATES) >= 2
    subprocess.run(["bash", "-n", str(JOB_BODY)], check=True)
    for t in TEMPLATES:
        subprocess.run(["bash", "-n", str(t)], check=True)
        text = t.read_text()
        assert 'source "$llmtrain_body"' in text and BODY_MARKER not in text, t.name  # no copy of the body
        for opt in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--gpus-per-node=8"):
            assert f"#SBATCH {opt}" in text, (t.name, opt)


def fake_slurm(tmp_path: Path, *, stop: str = "", rank_rc: int = 0, srun_rc: int | None = None) -> dict:
    """An environment in which a batch script runs without SLURM: srun runs its command here, scontrol
    answers for a RUNNING job 7 and records requeues, and the "python" of the ranks records its arguments
    (and writes rank 0's stop record `stop`, as a signal before train.steps would) and exits `rank_rc`.
    With `srun_rc`, srun writes the rank's output to its --output log as the real one does, then exits
    with that status whatever the rank's was (as srun signalled by a cancel may)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = 'while [[ $1 == --* ]]; do shift; done; exec "$@"'
    if srun_rc is not None:
        srun = (
            "log=/dev/null; while [[ $1 == --* ]]; do [[ $1 == --output=* ]] && log=${1#--output=}; shift; done\n"
            f'"$@" >>"${{log//%t/0}}" 2>&1; exit {srun_rc}'
        )
    tools = {
        "srun": srun,
        "scontrol": f"""case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show job") echo "JobId=7 JobState=RUNNING Restarts=0" ;;
  requeue*) echo "$*" >>{tmp_path}/requeued ;;
esac""",
        "python": f'echo "$*" >>{tmp_path}/ranks\n[[ -n "{stop}" ]] && echo "{stop}" >"$LLMTRAIN_STOP_FILE"; exit {rank_rc}',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLMTRAIN_"))}
    return env | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "t",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "LLMTRAIN_PYTHON": str(bin_dir / "python"),
        "LLMTRAIN_LOG_DIR": str(tmp_path / "logs"),
    }


def run_job_script(script: Path, env: dict, tmp_path: Path, run_dir: Path) -> tuple[int, str]:
    """Run a batch script as sbatch would (overrides recipe=tiny and the run dir): (exit status, output)."""
    proc = subprocess.run(
        ["bash", str(script), "recipe=tiny", f"hydra.run.dir={run_dir}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def job_scripts(tmp_path: Path) -> list[Path]:
    """Both templates and a script that `cluster=slurm` would submit."""
    cfg = compose_config(
        "cluster=slurm",
        "train.device=cpu",
        "cluster.gpus_per_node=1",
        f"cluster.python={tmp_path}/bin/python",
    )
    rendered = tmp_path / "job.sbatch"
    rendered.write_text(render_script(cfg, name="t", log_dir=tmp_path / "logs"))
    return [*TEMPLATES, rendered]


@pytest.mark.parametrize("stop", ["", "40 160 2 ckpt"], ids=["finished", "stopped-and-requeued"])
def test_every_job_script_runs_the_job_body(tmp_path, stop):
    """Templates (which source slurm/job_body.sh) and submitted scripts (which carry a copy) run the same body:
    the ranks get the overrides and the run dir, the events record the run, a stop record requeues the job."""
    env = fake_slurm(tmp_path, stop=stop)
    for script in job_scripts(tmp_path):
        for f in ("ranks", "requeued"):
            (tmp_path / f).unlink(missing_ok=True)
        run_dir = tmp_path / f"run-{script.stem}"
        rc, out = run_job_script(script, env, tmp_path, run_dir)
        assert rc == 0, (script.name, out)
        assert (tmp_path / "ranks").read_text() == f"-m llmtrain recipe=tiny hydra.run.dir={run_dir}\n", (
            script
        )
        events = (tmp_path / "logs" / "t-7" / "events").read_text().splitlines()[-2:]
        if stop:
            assert "requeueing job 7 (restart 1 of at most 2) at step 40 of 160; it resumes from ckpt" in out
            assert (tmp_path / "requeued").read_text() == "requeue 7\n", script.name
            assert events[1].endswith(" end rc=0 step=40 requeue"), (script.name, events)
        else:
            assert "training step exited with status 0" in out and not (tmp_path / "requeued").exists()
            assert events[1].endswith(" end rc=0 step="), (script.name, events)
        assert events[0].endswith(" start restart=0"), (script.name, events)


@pytest.mark.parametrize("rank_rc", [0, 3])
def test_the_ranks_statuses_decide_not_sruns(tmp_path, rank_rc):
    """srun ending with a signal's status (134 here) while every rank exited 0 is a finished step, not a
    failed job; a rank's own error still fails the job with that rank's status."""
    env = fake_slurm(tmp_path, rank_rc=rank_rc, srun_rc=134)
    run_dir = tmp_path / "run"
    rc, out = run_job_script(TEMPLATES[0], env, tmp_path, run_dir)
    events = (tmp_path / "logs" / "t-7" / "events").read_text().splitlines()
    if rank_rc == 0:
        assert rc == 0, out
        assert "srun exited with status 134, but every rank exited with status 0" in out
        assert "training step exited with status 0" in out and events[-1].endswith(" end rc=0 step=")
    else:
        assert rc == 3, out
        assert "error: job 7 failed with exit status 3; rank 0" in out and "every rank" not in out
        assert " end rc=3 " in events[-1]


def test_a_template_submitted_outside_the_repo_says_where_to_submit_from(tmp_path):
    env = fake_slurm(tmp_path) | {"SLURM_SUBMIT_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(TEMPLATES[0])], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout.strip() == (
        f"llmtrain: error: {tmp_path}/slurm/job_body.sh not found; submit from the repo root "
        "(sbatch slurm/<template> ...)"
    )


def test_gpu_script_asks_for_one_task_per_gpu(tmp_path):
    cfg = compose_config(
        "cluster=slurm",
        "cluster.nodes=4",
        "cluster.partition=batch",
        "cluster.account=proj",
        "cluster.time=24:00:00",
        "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
        "cluster.extra_sbatch=[--exclusive,'mem=0']",
    )
    script = render_script(cfg, name="llmtrain-x", log_dir=tmp_path)
    directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    for opt in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=batch",
        "--account=proj",
        "--time=24:00:00",
        "--signal=B:USR1@120",
        "--requeue",
        "--exclusive",
        "--mem=0",
        f"--output={tmp_path}/%x-%j.out",
    ):
        assert opt in directives, opt
    assert "export LLMTRAIN_CONTAINER_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3" in script
    assert script.index(BODY_MARKER) > script.index("#SBATCH --requeue")
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


def test_cpu_script_requests_no_gpus(tmp_path):
    cfg = compose_config(
        "cluster=slurm", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1", "train.device=cpu"
    )
    script = render_script(cfg, name="n", log_dir=tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "--gpus-per-node" not in script.split(BODY_MARKER)[0]


def test_bad_cluster_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.requeue_limit=-1"):
        render_script(compose_config("cluster=slurm", "cluster.requeue_limit=-1"), name="n", log_dir=tmp_path)


@pytest.fixture
def stop_file(tmp_path, monkeypatch):
    """Rank 0 inside a job step: LLMTRAIN_STOP_FILE set as the job body sets it; no SLURM tools on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # as in a container without squeue/scontrol
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("LLMTRAIN_STOP_FILE", str(tmp_path / "stop"))
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "stop"


def checkpointed(run_dir: Path, step: int) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return run_dir


def test_a_stop_before_the_last_step_tells_the_batch_script(stop_file, tmp_path):
    run_dir = checkpointed(tmp_path / "run", 40)
    after_preemption(compose_config("train.steps=160", "cluster.requeue_limit=2"), run_dir)
    assert stop_file.read_text() == f"40 160 2 {run_dir}/checkpoints/step_00000040\n"


def test_a_stop_before_the_first_checkpoint_still_requeues(stop_file, tmp_path):
    """A warning during start-up stops the ranks before step 1: the job must requeue (and start over),
    not end COMPLETED as if the run were done."""
    (tmp_path / "run").mkdir()
    after_preemption(compose_config("train.steps=160", "cluster.requeue_limit=2"), tmp_path / "run")
    assert stop_file.read_text() == "0 160 2 the start (no checkpoint yet)\n"


def test_a_stop_at_the_last_step_is_a_finished_run(stop_file, tmp_path):
    after_preemption(compose_config("train.steps=40"), checkpointed(tmp_path / "run", 40))
    assert not stop_file.exists()


def test_only_rank_zero_writes_the_stop_file(stop_file, monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    after_preemption(compose_config("train.steps=160"), checkpointed(tmp_path / "run", 40))
    assert not stop_file.exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("04:00:00", 14400),
        ("90", 5400),
        ("2:30", 150),
        ("1-00:00:00", 86400),
        ("1-2", 93600),
        ("UNLIMITED", None),
    ],
)
def test_time_limits_in_slurm_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_a_warning_at_or_before_the_start_is_refused(tmp_path):
    cfg = compose_config("cluster=slurm", "cluster.time=00:02:00", "cluster.signal_seconds=120")
    with pytest.raises(ConfigError, match=r"cluster.signal_seconds=120: must be below cluster.time=00:02:00"):
        render_script(cfg, name="n", log_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"cluster.time='4h'"):
        render_script(compose_config("cluster=slurm", "cluster.time=4h"), name="n", log_dir=tmp_path)


def test_site_keys_reach_the_script(tmp_path):
    cfg = compose_config(
        "cluster=slurm",
        "cluster.nodes=2",
        "cluster.env=['NCCL_IB_HCA=mlx5_0','NCCL_DEBUG=WARN']",
        "cluster.setup=['module load cuda/12.8','source /opt/env.sh']",
        "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
        "cluster.container_mounts=[/data:/data]",
        "cluster.cpu_bind=cores",
    )
    script = render_script(cfg, name="my run", log_dir=tmp_path / "log dir")
    head = script.split(BODY_MARKER)[0]
    for line in (
        '#SBATCH --job-name="my run"',
        f'#SBATCH --output="{tmp_path}/log dir/%x-%j.out"',
        "#SBATCH --exclusive",  # multi-node GPU job: whole nodes by default
        "#SBATCH --mem=0",
        "export NCCL_IB_HCA=mlx5_0",
        "export LLMTRAIN_CONTAINER_MOUNTS=/data:/data",
        "export LLMTRAIN_CONTAINER_ENV=NCCL_IB_HCA,NCCL_DEBUG",
        "export LLMTRAIN_SRUN_ARGS=--cpu-bind=cores",
        "export LLMTRAIN_PYTHON=python",  # the container's, not this machine's venv
        "module load cuda/12.8",
    ):
        assert line in head.splitlines(), line
    assert "--exclusive" not in render_script(compose_config("cluster=slurm"), name="n", log_dir=tmp_path)
    py = compose_config("cluster=slurm", "cluster.container_image=img", "cluster.python=/opt/py/bin/python")
    assert "export LLMTRAIN_PYTHON=/opt/py/bin/python" in render_script(py, name="n", log_dir=tmp_path)
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


def test_quotes_in_a_job_name_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.job_name"):
        render_script(
            compose_config("cluster=slurm", "cluster.job_name='a\"b'"), name='a"b', log_dir=tmp_path
        )


def test_env_entries_must_be_name_value(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.env='NCCL_DEBUG': each entry is NAME=value"):
        render_script(compose_config("cluster=slurm", "cluster.env=[NCCL_DEBUG]"), name="n", log_dir=tmp_path)


def _entry(tmp_path, events: str, steps: int = 40) -> dict:
    run_dir, rank_logs = tmp_path / "run", tmp_path / "run" / "logs" / "j-7"
    rank_logs.mkdir(parents=True)
    (rank_logs / "events").write_text(events)
    (run_dir / "config.yaml").write_text(f"train:\n  steps: {steps}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 40}\n')  # the run dir's latest: another job's
    return {
        "job_id": "7",
        "name": "j",
        "run_dir": str(run_dir),
        "rank_logs": str(rank_logs),
        "log": "j-7.out",
    }


def test_status_of_a_forgotten_job_comes_from_its_own_records(tmp_path):
    """No squeue entry (MinJobAge) and no accounting: state, restarts, elapsed across restarts, the job's
    own progress, exit code and error line come from the job body's events file."""
    from llmtrain.launch.jobs import job_status

    events = "100 start restart=0\n130 end rc=0 step=12 requeue\n300 start restart=1\n"
    events += "310 end rc=3 step=17 rank=1 error=error: training diverged: 2 non-finite steps\n"
    s = job_status(_entry(tmp_path, events), None, None)
    assert (s["state"], s["restarts"], s["elapsed_s"], s["step"], s["steps"]) == ("FAILED", 1, 40, 17, "40")
    assert (s["exit_code"], s["error"], s["state_from"]) == (
        3,
        "error: training diverged: 2 non-finite steps",
        "job records",
    )


def test_status_of_a_job_that_never_ran_shows_no_progress(tmp_path):
    from llmtrain.launch.jobs import job_status

    s = job_status(_entry(tmp_path, ""), {"state": "CANCELLED", "restarts": "0", "reason": "None"}, None)
    assert (s["state"], s["step"], s["exit_code"], s["elapsed_s"]) == ("CANCELLED", None, None, 0)


def test_status_prefers_sacct_when_slurmctld_forgot_the_job(tmp_path):
    from llmtrain.launch.jobs import job_status

    s = job_status(_entry(tmp_path, "100 start restart=0\n"), None, {"state": "NODE_FAIL", "exit_code": "0"})
    assert (s["state"], s["state_from"]) == ("NODE_FAIL", "sacct")


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path):
    """dry_run=true cluster=slurm on a machine whose sbatch would record any call."""
    calls = tmp_path / "calls"
    (tmp_path / "bin").mkdir()
    for tool in ("sbatch", "squeue", "srun"):
        (tmp_path / "bin" / tool).write_text(f'#!/bin/bash\necho "{tool} $*" >> {calls}\nexit 1\n')
        (tmp_path / "bin" / tool).chmod(0o755)
    env = {**cli_env(), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "llmtrain",
        "recipe=tiny",
        "cluster=slurm",
        "cluster.nodes=2",
        "dry_run=true",
    ]
    cmd += [
        "train.global_batch_size=128",
        "cluster.preview=true",
        "cluster.partition=batch",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (
        "dry run: would submit job llmtrain-tiny: 2 node(s) x 8 rank(s) (1 GPU each), time 04:00:00, "
        in proc.stdout
    )
    assert "partition batch" in proc.stdout and "#SBATCH --exclusive" in proc.stdout
    assert "nothing submitted" in proc.stdout and not calls.exists()


@pytest.mark.parametrize(
    "stderr,expected",
    [
        (
            "sbatch: error: Could not establish a configuration source",
            "sbatch cannot reach the SLURM controller",
        ),
        ("sbatch: error: Node count specification invalid", "the partition cannot run this job"),
    ],
)
def test_an_unreachable_controller_is_not_blamed_on_the_request(tmp_path, monkeypatch, stderr, expected):
    from llmtrain.errors import UserError
    from llmtrain.launch.sbatch import sbatch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\necho '{stderr}' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(UserError, match=expected) as info:
        sbatch(tmp_path / "job.sbatch", [])
    assert "\n" not in str(info.value) and (("cluster.nodes" in str(info.value)) == (expected[0] == "t"))

"""SLURM launch pieces that need no daemons: templates, generated scripts, the requeue decision.

scontrol/squeue are replaced by small scripts on PATH that log their arguments. The end-to-end tests
against real slurmctld/slurmd are in test_slurm.py.
"""

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llmtrain.cli import CONFIG_DIR
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from llmtrain.errors import ConfigError
from llmtrain.launch import after_preemption
from llmtrain.launch.sbatch import BODY_MARKER, REPO, render_script, template_body

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))


def make_cfg(*overrides: str):
    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def test_templates_share_one_job_body_and_parse():
    assert len(TEMPLATES) >= 2
    bodies = {t.name: template_body(t) for t in TEMPLATES}
    assert len(set(bodies.values())) == 1, f"job bodies differ: {list(bodies)}; copy the body of train.sbatch"
    for t in TEMPLATES:
        subprocess.run(["bash", "-n", str(t)], check=True)
        text = t.read_text()
        for opt in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--gpus-per-node=8"):
            assert f"#SBATCH {opt}" in text, (t.name, opt)


def test_gpu_script_asks_for_one_task_per_gpu(tmp_path):
    cfg = make_cfg(
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
    cfg = make_cfg("cluster=slurm", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1", "train.device=cpu")
    script = render_script(cfg, name="n", log_dir=tmp_path)
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --cpus-per-task=1" in script
    assert "--gpus-per-node" not in script.split(BODY_MARKER)[0]


def test_bad_cluster_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.requeue_limit=-1"):
        render_script(make_cfg("cluster=slurm", "cluster.requeue_limit=-1"), name="n", log_dir=tmp_path)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """scontrol/squeue stand-ins: they append their argv to calls.log; squeue prints $FAKE_STATE."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool, out in (("scontrol", ""), ("squeue", 'echo "$FAKE_STATE"')):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $*" >> {calls}\n{out}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("FAKE_STATE", "RUNNING")
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return calls


def requeued(calls: Path) -> bool:
    return calls.exists() and "scontrol requeue 42" in calls.read_text()


def test_warning_signal_requeues_below_the_limit(fake_slurm, capsys):
    after_preemption(make_cfg("cluster.requeue_limit=2"), Path("/runs/r"))
    assert requeued(fake_slurm)
    assert "requeueing job 42 (restart 1 of at most 2)" in capsys.readouterr().out


def test_requeue_limit_stops_the_loop_with_a_message(fake_slurm, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    after_preemption(make_cfg("cluster.requeue_limit=2"), Path("/runs/r"))
    assert not requeued(fake_slurm)
    out = capsys.readouterr().out
    assert "already restarted 2 times (cluster.requeue_limit=2)" in out and "hydra.run.dir=/runs/r" in out


@pytest.mark.parametrize("state", ["COMPLETING", "CANCELLED", ""])
def test_cancelled_or_timed_out_jobs_are_not_requeued(fake_slurm, monkeypatch, capsys, state):
    monkeypatch.setenv("FAKE_STATE", state)  # scancel / time limit: slurmctld already ends the job
    after_preemption(make_cfg(), Path("/runs/r"))
    assert not requeued(fake_slurm)
    assert "not requeueing job 42" in capsys.readouterr().out


def test_only_rank_zero_requeues(fake_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    after_preemption(make_cfg(), Path("/runs/r"))
    assert not fake_slurm.exists()

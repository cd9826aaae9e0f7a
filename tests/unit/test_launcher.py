"""The launcher seam: cli.py asks the launcher of cluster.type (submit or train here, planned world size)
and the launcher whose job this process runs in (world size from the environment, stop records)."""

from pathlib import Path

import pytest
import yaml

from llmtrain import launch
from llmtrain.cli import CONFIG_DIR, preflight
from llmtrain.config.validate import CLUSTERS
from llmtrain.errors import UserError
from llmtrain.launch.launcher import LAUNCHERS, Launcher, launcher_class
from llmtrain.launch.local import LocalLauncher
from llmtrain.launch.slurm import SlurmLauncher
from tests.helpers import compose_config

ENV = (
    "WORLD_SIZE",
    "RANK",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "LLMTRAIN_STOP_FILE",
)


@pytest.fixture(autouse=True)
def outside_any_job(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_each_launcher_has_its_config_and_the_interface(name):
    """Adding a launcher is a module, its LAUNCHERS line and configs/cluster/<name>.yaml: validation accepts
    its cluster.type, the config selects it, and it has every method cli.py calls."""
    assert name in CLUSTERS
    assert yaml.safe_load((Path(CONFIG_DIR) / "cluster" / f"{name}.yaml").read_text())["type"] == name
    launcher = launch.select(compose_config(f"cluster={name}"))
    assert type(launcher) is launcher_class(name) and launcher.name == name
    methods = [m for m in vars(Launcher) if not m.startswith("_")]
    assert set(methods) >= {"inside_job", "submits", "world", "dispatch", "after_stop"}
    for method in methods:
        assert callable(getattr(type(launcher), method, None)), method


def test_planned_world_per_launcher_and_from_the_environment(monkeypatch):
    sizes = ("cluster.nodes=2", "cluster.gpus_per_node=4")
    assert launch.planned_world(compose_config(*sizes)) == 1  # local: this process
    assert launch.planned_world(compose_config(*sizes, "dry_run=true")) == 8  # a dry run plans the cluster
    assert launch.planned_world(compose_config("cluster=slurm", *sizes)) == 8  # what sbatch is asked for
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun started this rank
    assert launch.planned_world(compose_config("cluster=slurm", *sizes)) == 3
    monkeypatch.delenv("WORLD_SIZE")
    for var, value in (("SLURM_JOB_ID", "9"), ("SLURM_NTASKS", "6"), ("SLURM_PROCID", "0")):
        monkeypatch.setenv(var, value)  # srun started the ranks of a hand-submitted template (cluster=local)
    assert launch.planned_world(compose_config(*sizes)) == 6


def test_slurm_submits_only_from_outside_a_job_and_trains_in_its_step(monkeypatch):
    cfg = compose_config("cluster=slurm")
    assert launch.placed_by() is None and SlurmLauncher().submits(cfg)
    assert not LocalLauncher().submits(cfg) and not LocalLauncher().dispatch(cfg, 1, "torch")
    monkeypatch.setenv("SLURM_JOB_ID", "9")  # salloc or a batch script: srun from here, no second job
    assert isinstance(launch.placed_by(), SlurmLauncher) and not SlurmLauncher().submits(cfg)
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # the job's ranks: train
    assert SlurmLauncher().dispatch(cfg, 8, "megatron") is False


def test_cli_asks_the_launcher_whether_this_machine_trains(monkeypatch):
    """llama3_8b does not fit this machine: refused for cluster=local, accepted when it is submitted to GPUs
    it fits (the job runs elsewhere: checked against cluster.gpu_memory_gib, not this machine), refused
    again inside a SLURM allocation (srun would start it here)."""
    submitted = ["recipe=llama3_8b", "cluster=slurm", "cluster.nodes=2", "cluster.gpu_memory_gib=178"]
    with pytest.raises(UserError, match="llama3_8b needs ~"):
        preflight(["recipe=llama3_8b"])
    preflight(submitted)
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    with pytest.raises(UserError, match="llama3_8b needs ~"):
        preflight(submitted)


def test_a_stop_inside_a_slurm_job_is_recorded_whatever_cluster_says(monkeypatch, tmp_path):
    """after_preemption follows the job this process runs in: a template's ranks run with cluster=local."""
    monkeypatch.setenv("LLMTRAIN_STOP_FILE", str(tmp_path / "stop"))
    (tmp_path / "run").mkdir()
    launch.after_preemption(compose_config("train.steps=160"), tmp_path / "run")
    assert not (tmp_path / "stop").exists()  # outside a job: nothing to tell
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    launch.after_preemption(compose_config("train.steps=160"), tmp_path / "run")
    assert (tmp_path / "stop").read_text().startswith("0 160 ")

"""What is planned, or refused, before anything is written: a dry run writes nothing (no run dir, no .hydra/
in an existing one) and says which engine a run here takes; a submission checks memory against the planned
GPUs (cluster.gpu_memory_gib), not the login node; bad run dirs and machine mismatches are one line; a
diverged sweep point does not end the sweep."""

import pytest

from tests.helpers import run_cli_in_process


def test_a_dry_run_leaves_no_run_dir_and_an_existing_run_untouched(tmp_path):
    new = tmp_path / "new"
    proc = run_cli_in_process("recipe=tiny", "dry_run=true", f"hydra.run.dir={new}", check=True)
    assert "FLOPs/token" in proc.stdout and not new.exists()
    slurm = run_cli_in_process(
        "recipe=tiny",
        "cluster=slurm",
        "cluster.gpus_per_node=1",
        "dry_run=true",
        f"hydra.run.dir={new}",
        check=True,
    )
    assert "nothing submitted" in slurm.stdout and not new.exists()
    old = tmp_path / "old"
    (old / ".hydra").mkdir(parents=True)
    (old / ".hydra" / "overrides.yaml").write_text("- recipe=tiny\n")
    (old / "train.log").write_text("the run's log\n")
    run_cli_in_process("recipe=tiny", "dry_run=true", "optim.lr=1", f"hydra.run.dir={old}", check=True)
    assert (old / ".hydra" / "overrides.yaml").read_text() == "- recipe=tiny\n"
    assert (old / "train.log").read_text() == "the run's log\n"


def test_an_auto_engine_dry_run_says_which_engine_runs_here(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    auto = run_cli_in_process("recipe=llama3_1b", "dry_run=true", f"hydra.run.dir={tmp_path}", check=True)
    assert "engine       megatron" in auto.stdout and "a run here takes the torch engine" in auto.stdout
    torch_plan = run_cli_in_process(
        "recipe=llama3_1b", "engine=torch", "dry_run=true", f"hydra.run.dir={tmp_path}", check=True
    )
    assert "a run here" not in torch_plan.stdout and "memory/process weights" in torch_plan.stdout


@pytest.mark.parametrize(("gib", "fits"), [(80, False), (178, True)])
def test_a_submission_checks_the_planned_gpus_memory(tmp_path, monkeypatch, gib, fits):
    """llama3_8b NVFP4 on 4 nodes: ~83 GiB per GPU (dry run); refused at 80 GiB before sbatch is asked."""
    from llmtrain.launch import sbatch

    monkeypatch.setattr(sbatch.shutil, "which", lambda name: None)  # never submit from a test
    args = ["recipe=llama3_8b", "precision=nvfp4", "cluster=slurm", "cluster.nodes=4"]
    proc = run_cli_in_process(*args, f"cluster.gpu_memory_gib={gib}", f"hydra.run.dir={tmp_path / 'r'}")
    if fits:  # past the memory check: the next refusal is the missing sbatch
        assert proc.returncode == 2 and "`sbatch` not found" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "needs ~83" in proc.stderr and "cluster.gpu_memory_gib=80" in proc.stderr


def test_a_diverged_sweep_point_does_not_stop_the_others(tmp_path):
    """An ablation sweep: the point at lr=1e8 diverges (exit 3 at the end, one line naming it), the next
    point still trains to the end."""
    proc = run_cli_in_process(
        "-m", "recipe=tiny", "optim.lr=1e8,1e-3", "train.steps=6", "train.nan.max_skips=0",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: point 0 (recipe=tiny optim.lr=100000000.0") and "goes on" in errors[0]
    assert "last good checkpoint: none written yet" in errors[0]
    assert errors[-1].startswith("error: 1 sweep point(s) diverged: point 0")
    assert '"step": 6' in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()[-1]


def test_train_device_cuda_without_cuda_is_refused_before_the_run_dir_is_written(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    proc = run_cli_in_process("recipe=tiny", "train.device=cuda", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and proc.stderr == (
        "error: train.device='cuda': CUDA is not available on this machine (allowed: auto, cpu)\n"
    )
    assert not run.exists()


def test_run_dir_with_a_quoted_tilde_is_the_home_dir_and_an_empty_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    proc = run_cli_in_process("recipe=tiny", "train.steps=1", "hydra.run.dir='~/x'", check=True)
    assert (tmp_path / "home" / "x" / "metrics.jsonl").exists() and not (tmp_path / "~").exists(), proc.stdout
    for empty in ("hydra.run.dir=", "hydra.run.dir=''"):
        proc = run_cli_in_process("recipe=tiny", "train.steps=1", empty)
        assert proc.returncode == 2 and proc.stderr.startswith("error: hydra.run.dir is empty"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # nothing trained into the cwd


def test_a_run_refused_while_building_leaves_the_runs_config_yaml(tmp_path, monkeypatch):
    from llmtrain.errors import ConfigError
    from llmtrain.train import loop

    run = tmp_path / "run"
    run_cli_in_process("recipe=tiny", "train.steps=2", f"hydra.run.dir={run}", check=True)
    before = (run / "config.yaml").read_text()

    def refuse(*args, **kwargs):
        raise ConfigError("data.paths", "x", "refused at data build")

    monkeypatch.setattr(loop, "build_data", refuse)
    proc = run_cli_in_process("recipe=tiny", "train.steps=4", "optim.lr=0.5", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "refused at data build" in proc.stderr, proc.stderr
    assert (run / "config.yaml").read_text() == before


def test_a_dir_with_another_tools_metrics_is_refused_not_appended_to(tmp_path):
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    proc = run_cli_in_process("recipe=tiny", "train.steps=1", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "would append to another run's metrics" in proc.stderr, proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1, "acc": 0.5}\n'


def test_dry_runs_remove_the_dirs_they_made_and_sweeps_write_no_points_record(tmp_path):
    run_cli_in_process(
        "recipe=tiny", "dry_run=true", f"hydra.run.dir={tmp_path / 'a' / 'b' / 'c'}", check=True
    )
    assert list(tmp_path.iterdir()) == []  # a/b/c all made by the dry run
    sweep = tmp_path / "sweep"
    run_cli_in_process(
        "-m", "recipe=tiny", "dry_run=true", "train.seed=1,2", f"hydra.sweep.dir={sweep}", check=True
    )
    assert not list(sweep.glob("*/.hydra"))


def test_only_rank_0_writes_hydras_record_and_a_bad_lock_file_is_one_line(tmp_path, monkeypatch):
    from llmtrain import cli
    from llmtrain.config.resolvers import register_resolvers
    from llmtrain.config.schema import register_configs

    register_configs()
    register_resolvers()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "hydra.output_subdir=null" in cli.plan_before_hydra(
        ["recipe=tiny", f"hydra.run.dir={tmp_path / 'r'}"]
    )
    monkeypatch.setenv("RANK", "0")
    assert "hydra.output_subdir=null" not in cli.plan_before_hydra(
        ["recipe=tiny", f"hydra.run.dir={tmp_path / 'r'}"]
    )
    from llmtrain.train import run_lock

    run_lock.release_all()
    (tmp_path / "s" / ".llmtrain.train.lock").mkdir(parents=True)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    proc = run_cli_in_process("recipe=tiny", "train.steps=1", f"hydra.run.dir={tmp_path / 's'}")
    assert (
        proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot open its lock file" in proc.stderr
    )

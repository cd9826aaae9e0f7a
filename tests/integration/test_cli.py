"""End to end through `python -m llmtrain`: run-dir contract, overrides, multirun, dry run, user errors."""

import json
import re

import pytest
import yaml

from tests.helpers import FAST, read_metrics, run_cli_in_process


def test_run_dir_contract(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli_in_process(
        *FAST,
        "train.steps=4",
        "train.checkpoint_interval=2",
        f"hydra.run.dir={run_dir}",
        "optim.lr=2e-3",
        check=True,
    )
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= r.keys()
    assert records[-1]["tokens"] == 4 * 4 * 64
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optim"]["lr"] == 2e-3 and config["model"]["hidden_size"] == 64
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000004"
    last = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir / "metrics.jsonl") in last and str(run_dir / "checkpoints" / latest) in last
    assert str(run_dir / "config.yaml") in last


def test_same_run_dir_resumes_and_resume_never_starts_fresh_elsewhere(tmp_path):
    run_dir = tmp_path / "run"
    run_cli_in_process(*FAST, "train.steps=3", f"hydra.run.dir={run_dir}", check=True)
    again = run_cli_in_process(*FAST, "train.steps=5", f"hydra.run.dir={run_dir}", check=True)
    assert "resumed from" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    fresh = run_cli_in_process(
        *FAST, "train.steps=2", "train.resume=never", f"hydra.run.dir={run_dir}", check=True
    )
    assert "resumed from" not in fresh.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]  # old run untouched
    assert [r["step"] for r in read_metrics(tmp_path / "run-restart1")] == [1, 2]


def test_cfg_job_prints_resolved_config_with_overrides():
    proc = run_cli_in_process(
        "--cfg", "job", "recipe=llama3_8b", "precision=nvfp4", "optim.lr=6e-4", check=True
    )
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["num_layers"] == 32 and cfg["model"]["ffn_hidden_size"] == 14336
    assert cfg["precision"]["name"] == "nvfp4" and cfg["optim"]["lr"] == 6e-4


def test_multirun_gives_each_point_its_own_dir(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli_in_process(
        "-m",
        *FAST,
        "recipe=tiny",
        "precision=bf16",
        "optim.lr=1e-3,3e-3",
        "train.steps=2",
        f"hydra.sweep.dir={sweep}",
        check=True,
    )
    lrs = []
    for sub in ("0", "1"):
        cfg = yaml.safe_load((sweep / sub / "config.yaml").read_text())
        lrs.append(cfg["optim"]["lr"])
        assert len(read_metrics(sweep / sub)) == 2
    assert sorted(lrs) == [1e-3, 3e-3]


def test_low_precision_recipe_takes_bridge_low_precision_values():
    bf16 = yaml.safe_load(
        run_cli_in_process("--cfg", "job", "--resolve", "recipe=llama3_8b", check=True).stdout
    )
    fp8 = yaml.safe_load(
        run_cli_in_process(
            "--cfg", "job", "--resolve", "recipe=llama3_8b", "precision=fp8_cs", check=True
        ).stdout
    )
    assert (bf16["train"]["global_batch_size"], bf16["optim"]["lr"], bf16["optim"]["min_lr"]) == (
        512,
        3e-4,
        3e-5,
    )
    assert (fp8["train"]["global_batch_size"], fp8["optim"]["lr"], fp8["optim"]["min_lr"]) == (
        768,
        6e-4,
        6e-6,
    )


def test_dry_run_llama3_8b_nvfp4_on_cpu():
    proc = run_cli_in_process("recipe=llama3_8b", "precision=nvfp4", "dry_run=true", check=True)
    out = proc.stdout
    params = int(re.search(r"\(([\d,]+)\)", out).group(1).replace(",", ""))
    assert abs(params - 8.03e9) / 8.03e9 < 0.005
    assert "57.91 GFLOP" in out
    assert "global 768 = micro 1 x dp 1 x grad-accum 768" in out
    assert re.search(r"weights [\d.]+ \| grads [\d.]+ \| optimizer [\d.]+ \| activations [\d.]+", out)


def test_user_errors_exit_2_with_one_line_and_no_traceback():
    for args in (["train.foo=1"], ["precision=fp7"], ["recipe=llama3_8b"], ["parallel.tp=2"]):
        proc = run_cli_in_process(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_metrics_are_json_lines(tmp_path):
    run_cli_in_process(*FAST, "train.steps=2", f"hydra.run.dir={tmp_path}", check=True)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.slow
def test_sigterm_stops_a_local_sweep_and_the_same_command_resumes_it(tmp_path):
    import signal
    import subprocess
    import time

    from tests.helpers import REPO, cli_env, llmtrain_cmd

    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "optim.lr=1e-3,3e-3", "train.steps=200", "train.checkpoint_interval=50",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen(llmtrain_cmd(*args), env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "remaining points were not started" in out
    assert not (sweep / "1").exists()  # the second point never started
    done = len(read_metrics(sweep / "0"))
    budget = done + 5  # shorter than the first command's, to keep the test quick
    run_cli_in_process(*args[:-3], f"train.steps={budget}", f"hydra.sweep.dir={sweep}", check=True)
    assert len(read_metrics(sweep / "1")) == budget
    assert read_metrics(sweep / "0")[done]["step"] == done + 1  # point 0 went on from its checkpoint


def test_run_dir_and_hydra_level_problems_are_one_line_with_a_fix_that_works(tmp_path):
    (tmp_path / "afile").write_text("")
    cases = [
        (f"hydra.run.dir={tmp_path / 'afile'}", "is a file, not a directory"),
        (f"hydra.run.dir={tmp_path / 'afile' / 'run'}", "is a file, not a directory"),
        (f"hydra.run.dir={tmp_path / 'runs' / 'éte'}", f"write it as \"hydra.run.dir='{tmp_path / 'runs' / 'éte'}'\""),
        ("data.split=90,10,0", "write \"data.split='90,10,0'\""),
    ]  # fmt: skip
    for arg, expected in cases:
        proc = run_cli_in_process(*FAST, "train.steps=1", arg)
        assert proc.returncode == 2, (arg, proc.stderr)
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in proc.stderr, (arg, proc.stderr)
    assert (tmp_path / "afile").read_text() == ""
    # the suggested forms work as printed (the shell strips the outer double quotes)
    run_dir = tmp_path / "runs" / "éte"
    run_cli_in_process(
        *FAST, "train.steps=1", f"hydra.run.dir='{run_dir}'", "data.split='90,10,0'", check=True
    )
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["split"] == "90,10,0"


def test_recipes_outside_the_repo_in_all_three_forms(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny\ntrain:\n  steps: 7\noptim:\n  lr: 1.0e-3\n"
    )
    for args in (
        [f"recipe={tmp_path / 'recipe' / 'mine.yaml'}"],
        ["--config-dir", str(tmp_path), "recipe=mine"],
        [f"hydra.searchpath=[file://{tmp_path}]", "recipe=mine"],
    ):
        cfg = yaml.safe_load(run_cli_in_process("--cfg", "job", *args, check=True).stdout)
        assert (cfg["train"]["steps"], cfg["optim"]["lr"]) == (7, 1e-3), args
    # validated like the shipped recipes: a bad value is one line before anything runs
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ntrain:\n  micro_batch_size: 0\n")
    proc = run_cli_in_process(
        "--config-dir", str(tmp_path), "recipe=mine", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert proc.returncode == 2 and "train.micro_batch_size=0: must be > 0" in proc.stderr
    assert not (tmp_path / "run").exists()

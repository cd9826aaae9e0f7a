"""scripts/run_study.sh on the CPU: corpus, one point, the results archive, skip when finished, budget."""

import json
import subprocess
import sys
import sysconfig
import tarfile

import pytest

from tests.helpers import REPO, cli_env

# A few stdlib packages as the corpus: 40-odd documents, enough for a 2% validation split.
ROOTS = " ".join(f"{sysconfig.get_paths()['stdlib']}/{p}" for p in ("email", "json", "http", "logging"))
# A small model (the study's vocabulary: the corpus's tokenizer) and a few steps on one CPU thread.
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=172",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.steps=4",
    "train.eval_interval=2",
    "train.eval_steps=1",
    "train.checkpoint_interval=0",
    "optim.warmup_steps=1",
    "engine=torch",
    "train.device=cpu",
]


def driver(tmp_path, *args, budget=500, extra_env=None):
    env = (
        cli_env()
        | {
            "OUT": str(tmp_path / "out"),
            "STUDY_DIR": str(tmp_path / "study"),
            "STUDY_CORPUS_ARGS": f"--roots {ROOTS} --workers 1",
            "STUDY_OVERRIDES": " ".join(SMALL),
            "STUDY_NEW_CORPUS": "1",  # not the corpus recorded in docs/results/gpu
            "BUDGET": str(budget),
            "PYTHON": sys.executable,
        }
        | (extra_env or {})
    )
    return subprocess.run(
        ["bash", "scripts/run_study.sh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_driver_builds_the_corpus_runs_a_point_and_skips_it_when_finished(tmp_path):
    proc = driver(tmp_path, "run", "bf16_s2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "study" / "runs" / "bf16_s2"  # the run dir is named by the point
    assert [p.name for p in run.parent.iterdir() if p.is_dir()] == ["bf16_s2"]  # only the point asked for
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[-1]
    assert "bf16_s2: rc=0 (done)" in proc.stdout
    with tarfile.open(tmp_path / "out" / "study_results.tar.gz") as tar:
        names = set(tar.getnames())
    expected = {"./bf16_s2/metrics.jsonl", "./bf16_s2/config.yaml", "./bf16_s2/.hydra/overrides.yaml"}
    expected |= {"./corpus/summary.json", "./corpus/sources.jsonl.gz", "./corpus/study.manifest.json"}
    assert expected <= names
    summary = json.loads((tmp_path / "study" / "corpus" / "summary.json").read_text())
    assert summary["documents"] > 30 and summary["tokens"] > 100_000

    again = driver(tmp_path, "run", "bf16_s2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "corpus: " in again.stdout and "up to date" in again.stdout
    assert "bf16_s2: finished" in again.stdout and "training for" not in again.stdout


def test_driver_starts_no_point_it_has_no_time_for(tmp_path):
    (tmp_path / "study" / "corpus").mkdir(parents=True)  # skip the build: pretend a corpus is there
    for name in ("study.idx", "summary.json", "sources.jsonl.gz", "study.manifest.json"):
        (tmp_path / "study" / "corpus" / name).write_text("{}")
    proc = driver(tmp_path, "run", "nvfp4_s1", budget=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvfp4_s1: not started" in proc.stdout
    assert not (tmp_path / "study" / "runs").exists()


@pytest.mark.slow
def test_measure_writes_a_throughput_table(tmp_path):
    env = {"MEASURE_MODELS": "study_85m", "MEASURE_STEPS": "3"}
    env["STUDY_OVERRIDES"] = " ".join([*SMALL, "precision.bf16_layers.last=0"])  # nvfp4 on 2 layers
    proc = driver(tmp_path, "measure", extra_env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "out" / "measure.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["study_85m-bf16_s1", "study_85m-nvfp4_s1"]
    assert all(line.split("|")[2].strip() == "3" for line in table[2:])  # MEASURE_STEPS

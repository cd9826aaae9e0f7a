"""The GPU study's recipe and its analysis: seed groups, mean ± std gaps, run status (synthetic runs)."""

import json
import statistics
import subprocess
import sys

import pytest
import yaml

from llmtrain.analysis.runs import (
    find_runs,
    gap_band,
    group_runs,
    group_table,
    run_status,
    seed_group,
    study_points,
    study_run_dir,
)
from llmtrain.cli import preflight
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from tests.helpers import REPO, cli_env

register_configs()
register_resolvers()

TOKENS_PER_STEP = 4096


def fake_run(path, point, losses, val=None, steps=None, tps=1000.0, mfu=0.25):
    """A run dir as the study writes it: metrics.jsonl, config.yaml, .hydra/overrides.yaml."""
    (path / ".hydra").mkdir(parents=True)
    records = []
    for i, loss in enumerate(losses):
        rec = {
            "step": i + 1,
            "loss": loss,
            "tokens": (i + 1) * TOKENS_PER_STEP,
            "tokens_per_s": tps,
            "mfu": mfu,
        }
        if val and i + 1 in val:
            rec["val_loss"] = val[i + 1]
        records.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"precision": {"name": point.split("_")[0]}, "train": {"steps": steps or len(losses)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"point={point}"]))


def make_study(root):
    """bf16 and nvfp4 over 3 seeds, one single-seed ablation; losses chosen so every gap differs."""
    bf16 = {1: [4.0, 3.0, 2.00, 2.00], 2: [4.0, 3.0, 2.02, 2.04], 3: [4.0, 3.0, 1.99, 1.96]}
    fp4 = {1: [4.0, 3.1, 2.05, 2.06], 2: [4.0, 3.1, 2.04, 2.10], 3: [4.0, 3.1, 2.07, 2.03]}
    for s in (1, 2, 3):
        fake_run(root / f"bf16_s{s}", f"bf16_s{s}", bf16[s], val={4: 2.1 + 0.01 * s})
        fake_run(root / f"nvfp4_s{s}", f"nvfp4_s{s}", fp4[s], val={4: 2.2 + 0.02 * s}, tps=800.0, mfu=0.2)
    fake_run(root / "nvfp4_no_rht", "nvfp4_no_rht", [4.0, 3.2, 2.3, 2.2], val={4: 2.4})
    return bf16, fp4


def cells(table, name):
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_labels_and_groups_come_from_the_point_names(tmp_path):
    make_study(tmp_path)
    runs = find_runs([tmp_path])
    assert sorted(r.label for r in runs) == sorted(
        [f"bf16_s{s}" for s in (1, 2, 3)] + [f"nvfp4_s{s}" for s in (1, 2, 3)] + ["nvfp4_no_rht"]
    )
    assert {k: len(v) for k, v in group_runs(runs).items()} == {"bf16": 3, "nvfp4": 3, "nvfp4_no_rht": 1}
    assert seed_group("nvfp4_s12") == "nvfp4" and seed_group("nvfp4_last0") == "nvfp4_last0"


def test_group_table_is_mean_and_sample_std_over_seeds_against_the_baseline_mean(tmp_path):
    bf16, fp4 = make_study(tmp_path)
    table = group_table(find_runs([tmp_path]), "bf16", window=2)
    # train loss: mean of the last 2 steps per seed; gap per seed relative to the mean over bf16's seeds
    base = statistics.fmean(statistics.fmean(bf16[s][-2:]) for s in (1, 2, 3))
    finals = [statistics.fmean(fp4[s][-2:]) for s in (1, 2, 3)]
    gaps = [100 * (f - base) / base for f in finals]
    row = cells(table, "nvfp4")
    assert row[:3] == ["nvfp4", "3", "4"]
    assert row[3] == f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"
    assert row[4] == f"{statistics.fmean(gaps):+.2f}% ± {statistics.stdev(gaps):.2f}%"
    val_base = statistics.fmean(2.1 + 0.01 * s for s in (1, 2, 3))
    val_gaps = [100 * (2.2 + 0.02 * s - val_base) / val_base for s in (1, 2, 3)]
    assert row[6] == f"{statistics.fmean(val_gaps):+.2f}% ± {statistics.stdev(val_gaps):.2f}%"
    assert row[7:] == ["800", "20.0%"]
    # the baseline's own row: mean gap 0, its spread is the seed noise; one seed: no ±
    assert cells(table, "bf16")[4].startswith(("+0.00% ±", "-0.00% ±"))
    single = cells(table, "nvfp4_no_rht")
    assert single[1] == "1" and "±" not in single[3] + single[4]
    assert single[4] == f"{100 * (statistics.fmean([2.3, 2.2]) - base) / base:+.2f}%"


def test_gap_band_per_step(tmp_path):
    bf16, fp4 = make_study(tmp_path)
    groups = group_runs(find_runs([tmp_path]))
    steps, mean, std = gap_band(groups["nvfp4"], groups["bf16"], "loss")
    assert steps == [1, 2, 3, 4]
    base3 = statistics.fmean(bf16[s][2] for s in (1, 2, 3))
    g3 = [100 * (fp4[s][2] - base3) / base3 for s in (1, 2, 3)]
    assert mean[2] == pytest.approx(statistics.fmean(g3)) and std[2] == pytest.approx(statistics.stdev(g3))
    assert std[0] == 0.0  # every seed starts at the same loss
    _, _, single = gap_band(groups["nvfp4_no_rht"], groups["bf16"], "loss")
    assert single == [None] * 4


def test_unfinished_group_is_compared_where_it_stopped(tmp_path):
    make_study(tmp_path)
    fake_run(tmp_path / "mxfp8", "mxfp8", [4.0, 3.0], steps=4)  # stopped at step 2 of 4
    table = group_table(find_runs([tmp_path]), "bf16", window=2)
    base = statistics.fmean([4.0, 3.0])  # every bf16 seed logged 4.0, 3.0 at steps 1-2
    assert cells(table, "mxfp8")[2:5] == ["2", "3.5000", f"{100 * (3.5 - base) / base:+.2f}%"]
    assert run_status(tmp_path / "mxfp8") == "partial"
    assert run_status(tmp_path / "bf16_s1") == "done"
    assert run_status(tmp_path / "nowhere") == "missing"


def test_compare_runs_writes_the_seed_plot_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    make_study(tmp_path / "runs")
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/compare_runs.py",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--window",
            "2",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "table_seeds.md").read_text() in proc.stdout
    assert cells((out / "table_seeds.md").read_text(), "nvfp4")[1] == "3"
    assert (out / "gap_seeds.png").stat().st_size > 10_000


def test_recipe_points_exist_and_run_dirs_are_named_by_point():
    points = study_points()
    assert len(points) == len(set(points))
    assert {f"{p}_s{s}" for p in ("bf16", "nvfp4") for s in (1, 2, 3)} <= set(points)
    assert {"fp8_cs", "mxfp8", "nvfp4_no_rht", "nvfp4_1d", "nvfp4_no_sr", "nvfp4_last0"} <= set(points)
    assert {"fp4all_qaf", "nvfp4_fwd_bf16_decay"} <= set(points)
    for p in points:
        assert (REPO / "configs" / "point" / f"{p}.yaml").is_file()
    assert str(study_run_dir("bf16_s2")) == ".study/runs/bf16_s2"
    assert str(study_run_dir("bf16_s2", ["model=study_85m", "hydra.sweep.dir=/x"])) == "/x/bf16_s2"


def test_every_point_composes_and_validates():
    """The whole sweep passes the CLI's pre-flight (mock data: the corpus is built on the GPU host)."""
    preflight(["-m", "recipe=gpu_study", "data.mock=true", "data.paths=[]", "train.check_memory=false"])


@pytest.mark.parametrize("model", ["study_125m", "study_85m"])
def test_point_settings(model):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfgs = {
            p: compose("train", ["recipe=gpu_study", f"point={p}", f"model={model}"])
            for p in ("bf16_s2", "nvfp4_s3", "nvfp4_no_sr", "nvfp4_last0")
        }
    assert cfgs["bf16_s2"].precision.name == "bf16" and cfgs["bf16_s2"].train.seed == 2
    assert cfgs["nvfp4_s3"].precision.name == "nvfp4" and cfgs["nvfp4_s3"].train.seed == 3
    assert cfgs["nvfp4_s3"].precision.wgrad_rounding == "stochastic"
    assert (
        cfgs["nvfp4_no_sr"].precision.wgrad_rounding
        == "nearest"
        == cfgs["nvfp4_no_sr"].precision.dgrad_rounding
    )
    assert cfgs["nvfp4_last0"].precision.bf16_layers.last == 0
    # same data, schedule and budget for every point
    shared = {
        (c.data.paths[0], c.data.seed, c.train.steps, c.train.global_batch_size, c.optim.schedule)
        for c in cfgs.values()
    }
    assert shared == {(".study/corpus/study", 1234, 800, 128, "wsd")}
    assert {c.model.name for c in cfgs.values()} == {model}

"""Load runs and summarise them against a baseline (relative loss gap, throughput, QAF switch step), alone
or grouped over seeds (points named NAME_s1, NAME_s2, ... as in recipes/gpu_study.yaml)."""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmtrain.errors import UserError


@dataclass
class Run:
    path: Path
    label: str
    records: list[dict]
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if r.get(key) is not None and not r.get("skipped")]
        return [s for s, _ in pts], [v for _, v in pts]

    @property
    def qaf_step(self) -> int | None:
        return next((r["step"] for r in self.records if r.get("qaf_switch")), None)

    @property
    def sqrt3_threshold(self) -> float:
        return float(self.config.get("precision", {}).get("monitor", {}).get("threshold", math.sqrt(3)))

    def _steady_median(self, key: str) -> float | None:
        # Median of steady-state steps: the first steps include warm-up and compilation.
        values = sorted(r[key] for r in self.records[len(self.records) // 5 :] if key in r)
        return values[len(values) // 2] if values else None

    @property
    def tokens_per_s(self) -> float | None:
        return self._steady_median("tokens_per_s")

    @property
    def mfu(self) -> float | None:
        return self._steady_median("mfu")


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return (yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def _short(override: str) -> str:
    """`precision=study/nvfp4_last0` -> `nvfp4_last0`, `precision.rht=false` -> `rht=false`,
    `point=nvfp4_s2` -> `nvfp4_s2`."""
    if override.startswith("point="):
        return override.removeprefix("point=")
    if override.startswith("precision="):
        return override.removeprefix("precision=").rpartition("/")[2]  # a variant in a subfolder
    return override.removeprefix("precision.")


def label_runs(runs: list["Run"]) -> None:
    """Label each run by the overrides that differ between the runs (e.g. `nvfp4 rht=false`)."""
    per_run = [{o.split("=")[0]: o for o in _overrides(r.path) if "hydra." not in o} for r in runs]
    keys = sorted({k for d in per_run for k in d})
    varying = [k for k in keys if len({d.get(k) for d in per_run}) > 1]
    for run, overrides in zip(runs, per_run):
        parts = [_short(overrides[k]) for k in varying if k in overrides]
        run.label = " ".join(parts) or run.config.get("precision", {}).get("name", run.path.name)
    counts = Counter(r.label for r in runs)
    for run in runs:
        if counts[run.label] > 1:  # e.g. the same precision from two sweeps: tell them apart by directory
            run.label = f"{run.label} ({run.path.parent.name}/{run.path.name})"


def _natural_key(path: Path) -> list:
    """Sweep job dirs in job order (2 before 10), not in string order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_run(run_dir: Path, label: str | None = None) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not an llmtrain run dir?); pass run directories")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    fallback = config.get("precision", {}).get("name", run_dir.name)
    return Run(path=run_dir, label=label or fallback, records=records, config=config)


def find_runs(roots: list[Path]) -> list[Run]:
    """Every run dir under the given paths (a sweep dir holds one per point)."""
    runs = []
    for root in roots:
        root = Path(root)
        dirs = (
            [root]
            if (root / "metrics.jsonl").is_file()
            else sorted((p.parent for p in root.rglob("metrics.jsonl")), key=_natural_key)
        )
        runs.extend(load_run(d) for d in dirs)
    if not runs:
        raise UserError(f"no runs (metrics.jsonl) under {', '.join(map(str, roots))}")
    label_runs(runs)
    return runs


def _mean_at(run: Run, key: str, steps: list[int]) -> float | None:
    """Mean of `key` over exactly these steps, or None if the run lacks one of them."""
    by_step = dict(zip(*run.series(key)))
    if not steps or any(s not in by_step for s in steps):
        return None
    return sum(by_step[s] for s in steps) / len(steps)


def summary_table(runs: list[Run], baseline: Run, window: int = 10) -> str:
    """One row per run. Gaps compare with the baseline at the same steps, so a shorter (or unfinished)
    run is compared with the baseline where it stopped, not with the baseline's end."""
    rows = [
        "| run | steps | final train loss | gap vs baseline | final val loss | val gap | tokens/s | QAF step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def gap(value, base):
        return f"{100 * (value - base) / base:+.2f}%" if value is not None and base else "n/a"

    def num(value, fmt):
        return format(value, fmt) if value is not None else "n/a"

    for run in runs:
        train_steps = run.series("loss")[0][-window:]
        val_steps = run.series("val_loss")[0][-1:]
        train, val = _mean_at(run, "loss", train_steps), _mean_at(run, "val_loss", val_steps)
        base_train, base_val = (
            _mean_at(baseline, "loss", train_steps),
            _mean_at(baseline, "val_loss", val_steps),
        )
        steps = run.records[-1]["step"] if run.records else 0
        rows.append(
            f"| {run.label} | {steps} | {num(train, '.4f')} | {gap(train, base_train)} | {num(val, '.4f')} "
            f"| {gap(val, base_val)} | {num(run.tokens_per_s, ',.0f')} | {run.qaf_step or '-'} |"
        )
    notes = (
        f"Train loss: mean of the last {window} logged steps; val loss: the last evaluation; gaps: relative "
        f"to {baseline.label} at the same steps; tokens/s: median step after the first 20% of the run (no "
        "eval); QAF step: the step that switched to quantization-aware finetuning."
    )
    return "\n".join(rows) + "\n\n" + notes + "\n"


# ---- seed groups (recipes/gpu_study.yaml: points NAME_s1, NAME_s2, ... differ only in train.seed) ------
SEED_SUFFIX = re.compile(r"_s(\d+)$")
VAL_BF16_KEY = "val_loss_bf16"  # validation loss of the same weights with a BF16 forward, where logged


def seed_group(label: str) -> str:
    """`nvfp4_s2` -> `nvfp4`; a label without a seed suffix is its own group."""
    return SEED_SUFFIX.sub("", label)


def group_runs(runs: list[Run], baseline: str | None = None) -> dict[str, list[Run]]:
    """Runs by seed group: the baseline group first, then the groups of several seeds, then the rest,
    each in the order of the runs."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(seed_group(run.label), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != baseline, len(kv[1]) == 1)))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_series(runs: list[Run], key: str, window: int = 1) -> dict[int, float]:
    """Mean over runs of the moving mean of `key`, at the steps every run logged."""
    from statistics import fmean

    per_run = []
    for run in runs:
        steps, values = run.series(key)
        per_run.append(dict(zip(steps, _moving_mean(values, window))))
    common = set.intersection(*(set(d) for d in per_run)) if per_run else set()
    return {s: fmean(d[s] for d in per_run) for s in sorted(common)}


def _moving_mean(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def gap_band(
    group: list[Run], baseline: list[Run], key: str, window: int = 1
) -> tuple[list[int], list[float], list[float | None]]:
    """Relative gap (%) of each run's (smoothed) `key` to the baseline's seed mean, at the steps every
    run of both logged: steps, mean over the group's seeds, sample std over them (None for one seed)."""
    base = mean_series(baseline, key, window)
    per_run = []
    for run in group:
        steps, values = run.series(key)
        per_run.append(dict(zip(steps, _moving_mean(values, window))))
    steps = sorted(set(base).intersection(*(set(d) for d in per_run)))
    means, stds = [], []
    for s in steps:
        mean, std = _mean_std([100 * (d[s] - base[s]) / base[s] for d in per_run])
        means.append(mean)
        stds.append(std)
    return steps, means, stds


def _fmt_mean_std(mean: float | None, std: float | None, fmt: str, unit: str = "") -> str:
    if mean is None:
        return "n/a"
    mean = round(mean, 12) + 0.0  # no "-0.00%" for a mean that is zero up to rounding
    text = f"{format(mean, fmt)}{unit}"
    return text + (f" ± {format(std, fmt.lstrip('+'))}{unit}" if std is not None else "")


def group_table(runs: list[Run], baseline_group: str, window: int = 10) -> str:
    """One row per seed group: seeds, final train and val loss, their gaps to the baseline group's seed
    mean at the same steps (mean ± sample std over seeds), tokens/s and MFU."""
    groups = group_runs(runs, baseline_group)
    if baseline_group not in groups:
        raise UserError(f"baseline group {baseline_group!r} matches none of: {', '.join(groups)}")
    base = groups[baseline_group]
    has_bf16_val = any(r.series(VAL_BF16_KEY)[0] for r in runs)
    head = "| point | seeds | steps | train loss | train gap | val loss | val gap |"
    head += " val loss, BF16 fwd | val gap, BF16 fwd |" if has_bf16_val else ""
    head += " tokens/s | MFU |"
    rows = [head, "|" + " --- |" + " ---: |" * (head.count("|") - 2)]
    for name, group in groups.items():
        steps = min(r.records[-1]["step"] if r.records else 0 for r in group)
        cells = [name, str(len(group)), str(steps)]
        keys = [("loss", window), ("val_loss", 1)] + ([(VAL_BF16_KEY, 1)] if has_bf16_val else [])
        for key, win in keys:
            # The last steps every run of the group and of the baseline logged: an unfinished run is
            # compared with the baseline where it stopped.
            common = sorted(set(mean_series(group, key)).intersection(mean_series(base, key)))
            last = common[-win:]
            finals = [_mean_at(r, key, last) for r in group]
            if not last or any(v is None for v in finals):
                cells += ["n/a", "n/a"]
                continue
            bases = [_mean_at(r, key, last) for r in base]
            base_mean = sum(bases) / len(bases)
            cells.append(_fmt_mean_std(*_mean_std(finals), ".4f"))
            cells.append(
                _fmt_mean_std(*_mean_std([100 * (v - base_mean) / base_mean for v in finals]), "+.2f", "%")
            )
        tps = [r.tokens_per_s for r in group if r.tokens_per_s is not None]
        mfu = [r.mfu for r in group if r.mfu is not None]
        cells.append(f"{sum(tps) / len(tps):,.0f}" if tps else "n/a")
        cells.append(f"{100 * sum(mfu) / len(mfu):.1f}%" if mfu else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    notes = (
        f"Groups: points that differ only in the seed suffix (_s1, _s2, ...). Train loss: mean of the last "
        f"{window} logged steps; val loss: the last evaluation; both at steps every run of the group and of "
        f"{baseline_group} reached. Gaps: relative to the mean over {baseline_group}'s seeds, as mean ± sample "
        f"std over the group's seeds (no ± for one seed; {baseline_group}'s own row is its seed spread). "
        "tokens/s, MFU: median step after the first 20% of each run, averaged over seeds; emulated formats "
        "(MXFP8, NVFP4 on Hopper) run extra quantization kernels, so their speed says nothing about Blackwell."
    )
    return "\n".join(rows) + "\n\n" + notes + "\n"


# ---- the GPU study's run dirs (scripts/run_study.sh) ---------------------------------------------------
STUDY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "gpu_study.yaml"
STUDY_RUNS = ".study/runs"


def study_points(recipe: Path = STUDY_RECIPE) -> list[str]:
    """The points of the recipe's sweep, in order."""
    params = yaml.safe_load(Path(recipe).read_text())["hydra"]["sweeper"]["params"]
    return [p.strip() for p in str(params["point"]).split(",") if p.strip()]


def study_run_dir(point: str, overrides: list[str] = ()) -> Path:
    """Where `python -m llmtrain -m recipe=gpu_study point=POINT [overrides]` writes: the sweep dir (the
    recipe's, or a hydra.sweep.dir override) / POINT."""
    sweep = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")), STUDY_RUNS)
    return Path(sweep) / point


def run_status(run_dir: Path) -> str:
    """`done` (metrics.jsonl reached config.yaml's train.steps), `partial`, or `missing`."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return "missing"
    try:
        steps = int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"])
        run = load_run(run_dir)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return "partial"
    last = max((r.get("step", 0) for r in run.records), default=0)
    return "done" if last >= steps else "partial"

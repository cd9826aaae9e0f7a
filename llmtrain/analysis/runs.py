"""Load runs and summarise them against a baseline (relative loss gap, throughput, QAF switch step)."""

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

    @property
    def tokens_per_s(self) -> float | None:
        # Median of steady-state steps: the first steps include warm-up and compilation.
        values = sorted(
            r["tokens_per_s"] for r in self.records[len(self.records) // 5 :] if "tokens_per_s" in r
        )
        return values[len(values) // 2] if values else None


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return (yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def _short(override: str) -> str:
    """`precision=study/nvfp4_last0` -> `nvfp4_last0`, `precision.rht=false` -> `rht=false`."""
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

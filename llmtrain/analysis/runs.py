"""Load runs and summarise them against a baseline (relative loss gap, throughput, QAF switch step)."""

import json
import math
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

    def final(self, key: str, window: int = 1) -> float | None:
        """Mean of the last `window` logged values (smooths noisy per-step train loss)."""
        _, values = self.series(key)
        values = [v for v in values if math.isfinite(v)]
        return sum(values[-window:]) / len(values[-window:]) if values else None

    @property
    def qaf_step(self) -> int | None:
        return next((r["step"] for r in self.records if r.get("qaf_switch")), None)

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
    return override.removeprefix("precision=").removeprefix("precision.")


def label_runs(runs: list["Run"]) -> None:
    """Label each run by the overrides that differ between the runs (e.g. `nvfp4 rht=false`)."""
    per_run = [{o.split("=")[0]: o for o in _overrides(r.path) if "hydra." not in o} for r in runs]
    keys = sorted({k for d in per_run for k in d})
    varying = [k for k in keys if len({d.get(k) for d in per_run}) > 1]
    for run, overrides in zip(runs, per_run):
        parts = [_short(overrides[k]) for k in varying if k in overrides]
        run.label = " ".join(parts) or run.config.get("precision", {}).get("name", run.path.name)


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
            else sorted(p.parent for p in root.rglob("metrics.jsonl"))
        )
        runs.extend(load_run(d) for d in dirs)
    if not runs:
        raise UserError(f"no runs (metrics.jsonl) under {', '.join(map(str, roots))}")
    label_runs(runs)
    return runs


def summary_table(runs: list[Run], baseline: Run, window: int = 10) -> str:
    base_train, base_val = baseline.final("loss", window), baseline.final("val_loss")
    rows = [
        "| run | steps | final train loss | gap vs baseline | final val loss | val gap | tokens/s | QAF step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def gap(value, base):
        return f"{100 * (value - base) / base:+.2f}%" if value is not None and base else "n/a"

    def num(value, fmt):
        return format(value, fmt) if value is not None else "n/a"

    for run in runs:
        train, val = run.final("loss", window), run.final("val_loss")
        steps = run.records[-1]["step"] if run.records else 0
        rows.append(
            f"| {run.label} | {steps} | {num(train, '.4f')} | {gap(train, base_train)} | {num(val, '.4f')} "
            f"| {gap(val, base_val)} | {num(run.tokens_per_s, ',.0f')} | {run.qaf_step or '-'} |"
        )
    return (
        "\n".join(rows) + f"\n\nTrain loss = mean of the last {window} steps; baseline: {baseline.label}.\n"
    )

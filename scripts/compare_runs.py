"""Compare runs: loss curves and relative loss gap to a baseline (PNG), and a markdown table.

    python scripts/compare_runs.py multirun/2026-12-01/12-53-33 --baseline bf16 --out docs/results

    python scripts/compare_runs.py docs/results/gpu --baseline bf16 --out docs/results/gpu   # GPU study

Reads each run's metrics.jsonl (and config.yaml / .hydra/overrides.yaml for labels). Writes
<out>/loss_curves.png, <out>/loss_gap.png, <out>/sqrt3.png (when a run logged the sqrt(3) monitor) and
<out>/table.md; prints the table. When runs repeat a point over seeds (labels NAME_s1, NAME_s2, ...), also
<out>/gap_seeds.png (gap to the baseline's seed mean over tokens, mean over seeds, ± 1 std shaded) and
<out>/table_seeds.md (one row per point: mean ± std over seeds).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmtrain.analysis.runs import find_runs, gap_band, group_runs, group_table, seed_group, summary_table
from llmtrain.errors import UserError

# The first steps fall from ~ln(vocab); leaving them out of the y range keeps the differences visible.
SKIP_FRACTION = 0.2


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _colors(runs, baseline) -> dict[str, object]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    others = [r for r in runs if r is not baseline]
    colors = {r.label: cmap(i % cmap.N) for i, r in enumerate(others)}
    colors[baseline.label] = "black"
    return colors


def _set_ylim(ax, values: list[float], pad: float = 0.05) -> None:
    if values:
        lo, hi = min(values), max(values)
        margin = (hi - lo) * pad or abs(hi) * pad or 1.0
        ax.set_ylim(lo - margin, hi + margin)


def _finish(fig, ax, path: Path, outside: bool = False) -> None:
    if outside:  # many overlapping lines: keep the legend off the data
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_losses(runs, baseline, colors, out: Path, window: int) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 5))
    visible = []
    for run in runs:
        c, lw = colors[run.label], 2.0 if run is baseline else 1.1
        steps, loss = run.series("loss")
        smoothed = smooth(loss, window)
        ax_t.plot(steps, smoothed, label=run.label, color=c, lw=lw)
        skip = steps[-1] * SKIP_FRACTION if steps else 0
        visible += [v for s, v in zip(steps, smoothed) if s >= skip]
        if run.qaf_step:
            ax_t.axvline(run.qaf_step, ls=":", lw=0.8, color=c)
        vsteps, vloss = run.series("val_loss")
        ax_v.plot(vsteps, vloss, marker="o", ms=3, label=run.label, color=c, lw=lw)
    _set_ylim(ax_t, visible)
    ax_t.set(xlabel="step", ylabel=f"train loss (moving mean, {window} steps)", title="Train loss")
    ax_v.set(xlabel="step", ylabel="validation loss", title="Validation loss")
    ax_v.grid(alpha=0.3)
    _finish(fig, ax_t, out / "loss_curves.png")
    plt.close(fig)


def plot_gap(runs, baseline, colors, out: Path, window: int) -> None:
    """Per-step relative gap of the smoothed train loss (lines) and of the val loss (markers)."""
    import matplotlib.pyplot as plt

    base_steps, base_loss = baseline.series("loss")
    base = dict(zip(base_steps, smooth(base_loss, window)))
    base_val = dict(zip(*baseline.series("val_loss")))
    skip = max(window, base_steps[-1] * SKIP_FRACTION if base_steps else 0)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    visible = []
    for run in runs:
        if run is baseline:
            continue
        c = colors[run.label]
        steps, loss = run.series("loss")
        pts = [(s, 100 * (v - base[s]) / base[s]) for s, v in zip(steps, smooth(loss, window)) if s in base]
        pts = [(s, g) for s, g in pts if s >= skip]
        ax.plot([s for s, _ in pts], [g for _, g in pts], label=run.label, color=c, lw=1.1)
        visible += [g for _, g in pts]
        val = [
            (s, 100 * (v - base_val[s]) / base_val[s])
            for s, v in zip(*run.series("val_loss"))
            if s in base_val
        ]
        ax.plot([s for s, _ in val], [g for _, g in val], ls="none", marker="o", ms=4, color=c)
        visible += [g for _, g in val]
    ax.axhline(0, color="k", lw=0.8)
    _set_ylim(ax, [*visible, 0.0])
    ax.set(
        xlabel="step",
        ylabel=f"loss gap to {baseline.label} (%)",
        title=f"Relative loss gap to {baseline.label}: train (lines, moving mean of {window}), validation (dots)",
    )
    _finish(fig, ax, out / "loss_gap.png", outside=True)
    plt.close(fig)


def plot_sqrt3(runs, colors, out: Path) -> bool:
    """Gradient-to-noise ratio of the sqrt(3) monitor (sqrt3/all) for the runs that logged it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    monitored = [r for r in runs if r.series("sqrt3/all")[0]]
    if not monitored:
        (out / "sqrt3.png").unlink(missing_ok=True)  # a stale plot from an earlier comparison
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for run in monitored:
        ax.plot(*run.series("sqrt3/all"), marker=".", label=run.label, color=colors[run.label], lw=1.1)
        if run.qaf_step:
            ax.axvline(run.qaf_step, ls=":", lw=0.8, color=colors[run.label])
    ax.axhline(monitored[0].sqrt3_threshold, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel="step", ylabel="||G_hp|| / ||G_q - G_hp|| (all quantized layers)", title="sqrt(3) monitor")
    _finish(fig, ax, out / "sqrt3.png")
    plt.close(fig)
    return True


def _tokens_per_step(runs) -> float | None:
    rec = next((r for run in runs for r in run.records if r.get("tokens") and r.get("step")), None)
    return rec["tokens"] / rec["step"] if rec else None


def plot_gap_seeds(groups: dict, baseline: str, out: Path, window: int) -> None:
    """Relative gap of each point to the baseline's seed mean over tokens: the mean over the point's
    seeds (train: line; val: dots), the seed spread (± 1 sample std) shaded where a point has >= 2 seeds."""
    import matplotlib.pyplot as plt

    runs = [r for g in groups.values() for r in g]
    per_step = _tokens_per_step(runs)
    scale, xlabel = (per_step / 1e6, "tokens (M)") if per_step else (1.0, "step")
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(11, 5.5))
    visible = []
    for i, (name, group) in enumerate(groups.items()):
        color = "black" if name == baseline else cmap(i % cmap.N)
        steps, mean, std = gap_band(group, groups[baseline], "loss", window)
        steps, mean, std = (
            zip(*[p for p in zip(steps, mean, std) if p[0] >= window]) if steps else ([], [], [])
        )
        x = [s * scale for s in steps]
        ax.plot(x, mean, color=color, lw=2.0 if name == baseline else 1.2, label=f"{name} (n={len(group)})")
        if len(group) > 1:
            lo = [m - (d or 0) for m, d in zip(mean, std)]
            hi = [m + (d or 0) for m, d in zip(mean, std)]
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
            visible += lo + hi
        visible += list(mean)
        vsteps, vmean, vstd = gap_band(group, groups[baseline], "val_loss")
        ax.errorbar(
            [s * scale for s in vsteps],
            vmean,
            yerr=[d or 0 for d in vstd],
            fmt="o",
            ms=4,
            color=color,
            capsize=2,
        )
    ax.axhline(0, color="k", lw=0.8)
    skip = SKIP_FRACTION * max((r.records[-1]["step"] for r in runs if r.records), default=0) * scale
    ax.set_xlim(left=skip)
    _set_ylim(ax, [v for v in visible if v == v] + [0.0])
    ax.set(
        xlabel=xlabel,
        ylabel=f"loss gap to the mean of {baseline} (%)",
        title=f"Gap to {baseline} over tokens: train (line, moving mean of {window} steps; band: ± 1 std over "
        "seeds), validation (dots, ± 1 std)",
    )
    _finish(fig, ax, out / "gap_seeds.png", outside=True)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs or sweep dirs containing them")
    ap.add_argument("--baseline", default="bf16", help="label (or its prefix) of the baseline run")
    ap.add_argument("--out", type=Path, default=Path("compare_out"))
    ap.add_argument("--window", type=int, default=10, help="moving-mean window for train loss")
    args = ap.parse_args(argv)
    try:
        if args.window < 1:
            raise UserError(f"--window {args.window}: must be >= 1 (steps in the moving mean)")
        runs = find_runs(args.runs)
        baseline = next((r for r in runs if r.label == args.baseline), None) or next(
            (r for r in runs if r.label.startswith(args.baseline)), None
        )
        if baseline is None:
            raise UserError(
                f"--baseline {args.baseline!r} matches none of: {', '.join(r.label for r in runs)}"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        table = summary_table(runs, baseline, args.window)
        (args.out / "table.md").write_text(table)
        import matplotlib

        matplotlib.use("Agg")
        colors = _colors(runs, baseline)
        plot_losses(runs, baseline, colors, args.out, args.window)
        plot_gap(runs, baseline, colors, args.out, args.window)
        written = ["loss_curves.png", "loss_gap.png"] + (
            ["sqrt3.png"] if plot_sqrt3(runs, colors, args.out) else []
        )
        base_group = seed_group(baseline.label)
        groups = group_runs(runs, base_group)
        if len(groups) < len(runs):  # some point ran with several seeds
            seeds_table = group_table(runs, base_group, args.window)
            (args.out / "table_seeds.md").write_text(seeds_table)
            plot_gap_seeds(groups, base_group, args.out, args.window)
            table += "\n" + seeds_table
            written += ["gap_seeds.png", "table_seeds.md"]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print("wrote " + ", ".join(str(args.out / f) for f in [*written, "table.md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

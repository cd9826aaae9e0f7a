"""Compare runs: loss curves and relative loss gap to a baseline (PNG), and a markdown table.

    python scripts/compare_runs.py multirun/2026-11-25/precision_sweep --baseline bf16 --out docs/results

Reads each run's metrics.jsonl (and config.yaml / .hydra/overrides.yaml for labels). Writes
<out>/loss_curves.png, <out>/loss_gap.png and <out>/table.md; prints the table.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmtrain.analysis.runs import find_runs, summary_table
from llmtrain.errors import UserError


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot(runs, baseline, out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, loss = run.series("loss")
        ax.plot(steps, smooth(loss, window), label=run.label, lw=1.2)
        if run.qaf_step:
            ax.axvline(run.qaf_step, ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel=f"train loss (moving mean, {window} steps)", title="Loss curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    base_steps, base_loss = baseline.series("loss")
    base = dict(zip(base_steps, smooth(base_loss, window)))
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        if run is baseline:
            continue
        steps, loss = run.series("loss")
        pts = [(s, 100 * (v - base[s]) / base[s]) for s, v in zip(steps, smooth(loss, window)) if s in base]
        ax.plot([s for s, _ in pts], [g for _, g in pts], label=run.label, lw=1.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="step", ylabel=f"relative train-loss gap to {baseline.label} (%)", title="Gap to baseline")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_gap.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs or sweep dirs containing them")
    ap.add_argument("--baseline", default="bf16", help="label (or its prefix) of the baseline run")
    ap.add_argument("--out", type=Path, default=Path("compare_out"))
    ap.add_argument("--window", type=int, default=10, help="moving-mean window for train loss")
    args = ap.parse_args(argv)
    try:
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
        plot(runs, baseline, args.out, args.window)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {args.out / 'loss_curves.png'}, {args.out / 'loss_gap.png'}, {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step-time stall of a checkpoint save, sync vs async (train.checkpoint_async), on this machine.

    python scripts/bench_checkpoint_stall.py --out /tmp/stall [--model tiny|study_125m] [--repeats 2]

Runs `python -m llmtrain` with periodic saves and reads metrics.jsonl: `checkpoint_s` is what a save cost
the training thread at its step (sync: the whole write; async: waiting for the previous save + the host
snapshot), `after_s` the extra time of the two steps after a save over the median step (async: the
background write competing for the CPU), and `run_s` the wall time of the run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ["recipe=tiny", "train.global_batch_size=8", "train.micro_batch_size=8"],
    "study_125m": ["recipe=tiny", "model=study_125m", "model.vocab_size=32768", "model.seq_length=128",
                   "train.global_batch_size=2", "train.micro_batch_size=2"],
}  # fmt: skip


def one_run(model: str, background: bool, run_dir: Path, steps: int, interval: int) -> dict:
    args = [*MODELS[model], f"train.steps={steps}", f"train.checkpoint_interval={interval}",
            "train.keep_last=1", "train.eval_interval=0", "train.device=cpu", "logging.wandb.mode=disabled",
            "logging.console=plain", f"train.checkpoint_async={str(background).lower()}",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=REPO, check=True, capture_output=True)
    run_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    periodic = [r["step"] for r in records if "checkpoint_s" in r and r["step"] < steps]
    plain = [
        r["step_time_s"] for r in records[1:] if "checkpoint_s" not in r and r["step"] - 1 not in periodic
    ]
    median = statistics.median(plain)
    after = [records[s]["step_time_s"] + records[s + 1]["step_time_s"] - 2 * median for s in periodic
             if s + 1 < len(records)]  # fmt: skip
    return {
        "checkpoint_s": [round(records[s - 1]["checkpoint_s"], 3) for s in periodic],
        "wait_s": [round(records[s - 1]["checkpoint_wait_s"], 3) for s in periodic],
        "after_s": [round(a, 3) for a in after],
        "median_step_s": round(median, 3),
        "run_s": round(run_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    for i in range(a.repeats):
        for background in (False, True):
            run_dir = a.out / f"{a.model}-{'async' if background else 'sync'}-{i}"
            result = one_run(a.model, background, run_dir, a.steps, a.interval)
            size = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
            print(json.dumps({"model": a.model, "async": background, "repeat": i,
                              "kept_checkpoint_mb": round(size / 1e6), **result}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Measured dry runs (`dry_run=measure`) of the 8-GPU and 2-node layouts docs/benchmarks.md plans, one GPU.

Each case is `python -m llmtrain recipe=<model> precision=<p> <layout> dry_run=measure` in a fresh process
(its own CUDA context and peak counter) with a time limit; each appends one JSON line (the measurement,
or why it failed) to --out. Cases run most informative first, and no case starts that cannot finish inside
--budget seconds, so a cut-off call still leaves the first rows. `render` turns the JSON lines into the
docs/benchmarks.md tables: layout x precision x stage, builds yes/no, estimated vs measured peak GiB, then
every estimate component next to its measurement (to see which one is off).

    PYTHONPATH=/opt/gpu-site:$PWD python scripts/measure_layouts.py run --out $OUT/measure.jsonl --budget 470 \
        --skip-done docs/benchmarks/h100-2026-12-07/measure.jsonl      # continue an earlier session's cases
    python scripts/measure_layouts.py render $OUT/measure.jsonl > table.md
    python scripts/measure_layouts.py render old.jsonl new.jsonl   # one row per case, the later file's wins
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides; the planned world is cluster.nodes x cluster.gpus_per_node (8 GPUs per node).
LAYOUTS = {
    "TP2xDP4": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "PP2(vpp4)xDP4": ["parallel.pp=2", "parallel.vpp=4"],
    "TP2xCP2xDP2": ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"],
    "DP8": [],
    "2 nodes: TP2xDP8": ["cluster.nodes=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
}
STAGES = {"PP2(vpp4)xDP4": ("first", "last")}  # other layouts have one pipeline stage
PRECISIONS = ("fp8_cs", "bf16", "nvfp4")
MODELS = ("llama3_8b", "research_8b")
RANK = {"first": 0, "last": -1}


def cases() -> list[dict]:
    """Most informative first: every layout for llama3_8b FP8-CS (the planned production run) and the
    low-precision all-gather's effect, then BF16 and NVFP4, then research_8b in the same order."""
    out = []
    for model in MODELS:
        for prec in PRECISIONS:
            for layout, over in LAYOUTS.items():
                for stage in STAGES.get(layout, ("first",)):
                    out.append({"model": model, "precision": prec, "layout": layout, "stage": stage,
                                "overrides": list(over)})  # fmt: skip
                if model == "llama3_8b" and prec == "fp8_cs" and layout == "TP2xDP4":
                    out.append({"model": model, "precision": prec, "layout": layout, "stage": "first",
                                "overrides": [*over, "parallel.lowp_param_gather=false"],
                                "variant": "lowp_param_gather=false"})  # fmt: skip
    return out


def command(case: dict, json_path: Path, steps: int, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "llmtrain", f"recipe={case['model']}", f"precision={case['precision']}",
        "cluster.gpus_per_node=8", *case["overrides"], "dry_run=measure",
        f"measure.rank={RANK[case['stage']]}", f"measure.steps={steps}", f"measure.json={json_path}",
        f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
    ]  # fmt: skip


def run_case(case: dict, timeout: float, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "result.jsonl"
        t0 = time.time()
        try:
            proc = subprocess.run(
                command(case, json_path, steps, Path(tmp) / "run"),
                cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        except subprocess.TimeoutExpired as exc:
            partial = (exc.stdout or b"").decode(errors="replace").strip().splitlines()[-3:]
            rc, tail = None, [f"timeout after {timeout:.0f} s", *partial]
        lines = json_path.read_text().splitlines() if json_path.exists() else []
        result = json.loads(lines[-1]) if lines else {"ok": False}
    result.update(case=case, rc=rc, wall_s=round(time.time() - t0, 1), log_tail=tail)
    if rc is None:
        result.setdefault("error", tail[0])
    elif rc != 0 and "error" not in result:
        result["error"] = next((t for t in reversed(tail) if t.strip()), f"exit {rc}")
    return result


def cmd_run(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = cases()
    if args.only:
        todo = [c for c in todo if all(w in json.dumps(c) for w in args.only.split(","))]
    if args.skip_done:  # a later session continues where an earlier one stopped
        done = {
            label(r["case"])
            for r in _records(args.skip_done.split(","))
            if r.get("ok") or (r.get("oom") and not args.retry_oom)
        }
        todo = [c for c in todo if label(c) not in done]
    start = time.time()
    for i, case in enumerate(todo):
        left = args.budget - (time.time() - start)
        if left < args.min_case:
            print(f"budget spent: {len(todo) - i} cases not run", flush=True)
            break
        r = run_case(case, min(args.timeout, left), args.steps)
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
        m = r.get("measured", {})
        print(
            f"[{i + 1}/{len(todo)}] {label(case)}: ok={r.get('ok')} peak={m.get('peak', float('nan')):.1f} "
            f"est={r.get('estimate', {}).get('total', float('nan')):.1f} GiB ({r['wall_s']} s) "
            f"{r.get('error', '')}",
            flush=True,
        )


# ---- render -----------------------------------------------------------------------------------------------
def label(case: dict) -> str:
    extra = f" [{case['variant']}]" if case.get("variant") else ""
    return f"{case['model']} {case['layout']} {case['precision']} {case['stage']}{extra}"


def _f(x) -> str:
    return "" if x is None else f"{x:.1f}"


COMPONENTS = [  # (column, estimate key, measured key)
    ("weights", "weights", "weights"),
    ("lowp copies / other", "weight_copies", "copies_and_other"),
    ("grads", "grads", "grads"),
    ("optimizer", "optimizer", "optimizer"),
    ("activations", "activations", "activations"),
]


def render(records: list[dict]) -> str:
    gpus = sorted({f"{r['gpu']} ({r['capability']})" for r in records if r.get("gpu")})
    out = [
        f"Measured on one {', '.join(gpus) or 'GPU'} with `dry_run=measure` (fake process group: memory and "
        "shapes real, losses and communication not). GiB = 2^30 bytes; peak = torch.cuda.max_memory_allocated.",
        "",
        "| model | layout | precision | stage (rank) | builds | estimate (GiB) | measured peak (GiB) | off | lowp param gather | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in records:
        c, est, m = r["case"], r.get("estimate", {}), r.get("measured", {})
        variant = f" [{c['variant']}]" if c.get("variant") else ""
        if r.get("ok"):
            builds = "yes"
            off = (est["total"] - m["peak"]) / m["peak"] * 100
            off_s = f"{off:+.0f}%" + ("" if abs(off) <= 10 else " **>10%**")
        else:
            builds = "no (OOM)" if r.get("oom") else "no"
            off_s = ""
        peak = m.get("peak", r.get("peak_before_oom_gib"))
        note = "emulated" if r.get("emulated") else ""
        if not r.get("ok"):
            note = (note + "; " if note else "") + str(r.get("error", ""))[:120].replace("|", "/")
        stage = f"{c['stage']} ({r.get('rank', '?')})" if "rank" in r else c["stage"]
        out.append(
            f"| {c['model']} | {c['layout']}{variant} | {c['precision']} | {stage} | {builds} | "
            f"{_f(est.get('total'))} | {_f(peak)}{'' if r.get('ok') else ' (at failure)' if peak else ''} | "
            f"{off_s} | {r.get('lowp_param_gather', '')} | {note} |"
        )
    out += [
        "",
        "Components, estimate / measured (GiB). Measured: weights = parameter storage, grads = DDP main-grad "
        "buffers, optimizer = master weights + Adam moments, lowp copies / other = everything else resident "
        "between steps (TE low-precision weight caches, workspaces), activations = peak of the last step "
        "minus resident at its start.",
        "",
        "| model | layout | precision | stage | " + " | ".join(c for c, _, _ in COMPONENTS) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in COMPONENTS) + " |",
    ]
    for r in records:
        if not r.get("ok"):
            continue
        c, est, m = r["case"], r["estimate"], r["measured"]
        variant = f" [{c['variant']}]" if c.get("variant") else ""
        cells = [f"{est[e]:.1f} / {m.get(k, m.get('other_resident', 0.0)):.1f}" for _, e, k in COMPONENTS]
        out.append(
            f"| {c['model']} | {c['layout']}{variant} | {c['precision']} | {c['stage']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "measure.jsonl"))
    r.add_argument("--budget", type=float, default=470.0, help="seconds for all cases together")
    r.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    r.add_argument("--min-case", type=float, default=45.0, help="start no case with less time left")
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--only", default="", help="comma-separated words every selected case contains")
    r.add_argument(
        "--skip-done",
        default="",
        help="comma-separated JSONL files: skip cases measured there (built, or a definitive out-of-memory)",
    )
    r.add_argument(
        "--retry-oom",
        action="store_true",
        help="with --skip-done: run again the cases that ran out of memory there (a larger GPU may build them)",
    )
    d = sub.add_parser("render")
    d.add_argument("jsonl", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "run" and args.retry_oom and not args.skip_done:
        ap.error("--retry-oom re-runs the out-of-memory cases of the --skip-done files: give --skip-done too")
    if args.cmd == "run":
        cmd_run(args)
    else:
        print(render(latest_per_case(_records(args.jsonl))))


def _records(paths: list[str]) -> list[dict]:
    """The JSON lines of `paths`; a missing file or a malformed line (a run killed mid-write) is one error
    line naming it, not a traceback."""
    out = []
    for p in paths:
        try:
            lines = Path(p).read_text().splitlines()
        except OSError as e:
            raise SystemExit(f"measure_layouts: cannot read {p}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(
                    f"measure_layouts: {p}:{n} is not a JSON record ({e.msg}); remove or repair that line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("case"), dict):
                raise SystemExit(f"measure_layouts: {p}:{n} has no 'case': not a measure_layouts record")
            out.append(record)
    return out


def latest_per_case(records: list[dict]) -> list[dict]:
    """One row per case, the last record of it winning (a later session's re-run of a case that failed on a
    bug replaces the failure), in the order the cases first appear."""
    latest: dict[str, dict] = {}
    for r in records:
        latest[label(r["case"])] = r  # an existing key keeps its place in the dict's order
    return list(latest.values())


if __name__ == "__main__":
    main()

"""Where one training step's GPU time goes: torch.profiler over one step, CUDA kernels grouped by kind.

Used by scripts/bench.py (`--profile`) and scripts/bench_bare_megatron.py (`--profile`), so llmtrain and the
bare Megatron-Core loop are measured the same way. Kernels are grouped by name (`classify`), except that
every kernel of the optimizer step (a `record_function` range around `optimizer.step`: kernels inside the
range the profiler mirrors on the GPU timeline, `gpu_user_annotation`, or launched inside the host-side
range, matched by correlation id) counts as optimizer. Host-to-device copies
count as data. `busy_ms` is the union of kernel and copy intervals; wall minus busy is time the GPU idled
(host overhead, synchronisation).

    python scripts/profile_step.py trace.json      # group an exported Chrome trace and print the table
"""

import json
import re
import sys
from contextlib import contextmanager

OPTIMIZER_MARK = "bench.optimizer_step"
CATEGORIES = ("quantize", "amax", "gemm", "attention", "cast", "optimizer", "communication", "data", "other")

# Order matters: the first matching rule wins (amax before quantize, attention before GEMM: flash kernels
# are CUTLASS-based; TE's fused cast-transpose before the generic cast rule).
_RULES = [
    ("amax", r"amax|reduce_max|compute_scale"),
    (
        "quantize",
        r"_fake_quant|fake_quant|quantize|cast_transpose|cast_fp8|fp8_quant|nvfp4|mxfp8|"
        r"transformer_engine.*((?<!broad)cast|transpose)|hadamard",
    ),
    ("attention", r"flash|fmha|attn|attention|sdpa|cudnn"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|cublas|sm\d+_.*_tn|s16816|s1688|hmma|wgmma|Kernel2"),
    ("optimizer", r"multi_tensor|adam|l2norm|clip_grad"),
    ("communication", r"nccl"),
    ("cast", r"copy_kernel|_to_copy|(?<!broad)cast|convert"),
]
_COMPILED = [(cat, re.compile(pat, re.IGNORECASE)) for cat, pat in _RULES]


def classify(name: str) -> str:
    """Category of one CUDA kernel by its (demangled) name."""
    for cat, pat in _COMPILED:
        if pat.search(name):
            return cat
    return "other"


def _inside(ev: dict, ranges: list[tuple[float, float]]) -> bool:
    start, end = ev["ts"], ev["ts"] + ev.get("dur", 0.0)
    return any(lo <= start and end <= hi for lo, hi in ranges)


def _launched_inside(ev: dict, launched: dict, ranges: list[tuple[float, float]]) -> bool:
    ts = launched.get(ev.get("args", {}).get("correlation"))
    return ts is not None and any(lo <= ts <= hi for lo, hi in ranges)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, cur_lo, cur_hi = 0.0, None, None
    for lo, hi in sorted(intervals):
        if cur_hi is None or lo > cur_hi:
            if cur_hi is not None:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    return total + (cur_hi - cur_lo if cur_hi is not None else 0.0)


def group_trace(trace: dict | list, top: int = 25) -> dict:
    """Kernel time per category (ms and share) from a Chrome trace (torch.profiler's export)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    events = [e for e in events if e.get("ph") == "X"]
    optimizer = [
        (e["ts"], e["ts"] + e.get("dur", 0.0))
        for e in events
        if e.get("cat") == "gpu_user_annotation" and e.get("name") == OPTIMIZER_MARK
    ]
    # Also by launch: a kernel whose launch (matched by correlation id) ran inside the host-side range.
    host_marks = [
        (e["ts"], e["ts"] + e.get("dur", 0.0))
        for e in events
        if e.get("cat") == "user_annotation" and e.get("name") == OPTIMIZER_MARK
    ]
    launched = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ms = dict.fromkeys(CATEGORIES, 0.0)
    counts = dict.fromkeys(CATEGORIES, 0)
    per_kernel: dict[str, list] = {}
    intervals = []
    for e in events:
        cat = e.get("cat", "")
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        name, dur = e.get("name", ""), float(e.get("dur", 0.0))
        if cat == "gpu_memcpy" and "HtoD" in name:
            group = "data"
        elif (optimizer and _inside(e, optimizer)) or _launched_inside(e, launched, host_marks):
            group = "optimizer"
        elif cat == "kernel":
            group = classify(name)
        else:
            group = "other"
        ms[group] += dur / 1e3
        counts[group] += 1
        k = per_kernel.setdefault(name, [group, 0.0, 0])
        k[1] += dur / 1e3
        k[2] += 1
        intervals.append((e["ts"], e["ts"] + dur))
    total = sum(ms.values())
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "kernel_ms": total,
        "busy_ms": _union_us(intervals) / 1e3,
        "categories": {
            c: {"ms": ms[c], "share": ms[c] / total if total else 0.0, "count": counts[c]} for c in CATEGORIES
        },
        "top_kernels": [{"name": n[:160], "category": g, "ms": t, "count": c} for n, (g, t, c) in kernels],
        "optimizer_marked": bool(optimizer or host_marks),
    }


@contextmanager
def _marked_optimizer_step(optimizer):
    import torch

    original = optimizer.step

    def step(*args, **kwargs):
        with torch.profiler.record_function(OPTIMIZER_MARK):
            return original(*args, **kwargs)

    optimizer.step = step
    try:
        yield
    finally:
        optimizer.step = original


def time_steps(run_step, steps: int) -> dict:
    """Wall time of each of `steps` calls of `run_step` (one training step each, synchronised at its end),
    and the time Python's cyclic garbage collector ran inside them.

    The step time reported is the median: a host-bound model (the 1B one launches ~4,000 kernels a step for
    ~0.3 s of GPU work) moves with the host's speed, and one slow step (a GC pass, another process on the
    CPU) would move a mean of a few steps by tens of percent. min and max show the spread.
    """
    import gc
    import statistics
    import time

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    in_gc, started = [0.0], [0.0]

    def on_gc(phase, _info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            in_gc[0] += time.perf_counter() - started[0]

    times = []
    probe_us = host_op_us()
    sync()
    gc.callbacks.append(on_gc)
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            run_step()
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(on_gc)
    return {
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "step_times_s": times,
        "gc_ms_per_step": in_gc[0] * 1e3 / steps,
        "host_op_us": probe_us,
    }


def host_op_us(calls: int = 5000, blocks: int = 5) -> float:
    """The host's speed right now: microseconds per `view` of a small CPU tensor (best of `blocks` blocks).

    The same operations took 0.75x and 1.77x as long in one llmtrain process as in the bare loop's on the
    H100 run (docs/benchmarks.md), which decides a host-bound step; this number makes that visible per cell.
    """
    import time

    import torch

    t = torch.zeros(4, 4)
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(calls):
            t.view(-1)
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def profile_one_step(run_step, optimizer, trace_path: str | None = None) -> dict:
    """Profile `run_step()` (one full training step) and group its kernels; optionally keep the trace."""
    import os
    import tempfile
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _marked_optimizer_step(optimizer), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run_step()
        sync()
        wall = time.perf_counter() - t0
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    if trace_path:
        import gzip

        with gzip.open(trace_path, "wt") as f:
            json.dump(trace, f)
    return {"wall_ms_profiled": wall * 1e3, **group_trace(trace)}


def markdown(rows: list[dict]) -> str:
    """Per (model, precision, implementation): ms per category (share of kernel time), then, per model and
    implementation, each precision's difference to BF16 by category: where a slower step loses its time."""
    head = "| model | precision | implementation | step (ms) | GPU busy (ms) | idle (ms) | " + " | ".join(
        CATEGORIES
    )
    out = [head + " |", "| " + " | ".join(["---"] * (6 + len(CATEGORIES))) + " |"]
    prof = [r for r in rows if r.get("profile")]
    for r in prof:
        p = r["profile"]
        step = r.get("step_time_s", p["wall_ms_profiled"] / 1e3) * 1e3  # timed without the profiler
        cells = [f"{p['categories'][c]['ms']:.1f} ({p['categories'][c]['share']:.0%})" for c in CATEGORIES]
        out.append(
            f"| {r.get('model', '')} | {r['precision']} | {r['impl']} | {step:.1f} | {p['busy_ms']:.1f} | "
            f"{step - p['busy_ms']:.1f} | " + " | ".join(cells) + " |"
        )
    base = {(r.get("model"), r["impl"]): r for r in prof if r["precision"] == "bf16"}
    deltas = []
    for r in prof:
        b = base.get((r.get("model"), r["impl"]))
        if b is None or b is r:
            continue
        p, q = r["profile"], b["profile"]
        cells = [f"{p['categories'][c]['ms'] - q['categories'][c]['ms']:+.1f}" for c in CATEGORIES]
        step = (r.get("step_time_s", 0.0) - b.get("step_time_s", 0.0)) * 1e3
        deltas.append(
            f"| {r.get('model', '')} | {r['precision']} - bf16 | {r['impl']} | {step:+.1f} | "
            f"{p['busy_ms'] - q['busy_ms']:+.1f} | {step - (p['busy_ms'] - q['busy_ms']):+.1f} | "
            + " | ".join(cells)
            + " |"
        )
    if deltas:
        out += [
            "",
            "Difference to BF16 (ms per step, same model and implementation):",
            "",
            out[0],
            out[1],
            *deltas,
        ]
    return "\n".join(out) + "\n"


# ---- host side: where the CPU time of a host-bound step goes ---------------------------------------------
HOST_PACKAGES = ("transformer_engine", "megatron", "llmtrain", "triton", "torch")


def host_package(filename: str) -> str:
    """The package a profiled function's file belongs to (the last of HOST_PACKAGES in its path, so
    torch's own files count as torch and a package vendored inside another as itself); else "other",
    "builtin" for C functions (cProfile's "~")."""
    if filename == "~":
        return "builtin"
    parts = re.split(r"[\\/]", filename)
    hits = [p for p in parts if p in HOST_PACKAGES]
    return hits[-1] if hits else "other"


def host_profile_one_step(run_step, top: int = 25) -> dict:
    """cProfile over `run_step()`: the host seconds spent in each package's own code (tottime; C functions
    as "builtin", which includes kernel launches and tensor allocation), and the `top` functions by own
    time. The GPU is synchronised before and after, so the wall time is the step's."""
    import cProfile
    import pstats
    import time

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run_step()
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    by_package: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in pstats.Stats(prof).stats.items():
        pkg = host_package(filename)
        by_package[pkg] = by_package.get(pkg, 0.0) + tottime
        rows.append({"function": f"{pkg}:{filename.rsplit('/', 1)[-1]}:{line}:{func}", "calls": ncalls,
                     "own_ms": tottime * 1e3, "cum_ms": cumtime * 1e3})  # fmt: skip
    rows.sort(key=lambda r: -r["own_ms"])
    return {"wall_ms_cprofile": wall * 1e3, "own_ms_by_package": {k: v * 1e3 for k, v in by_package.items()},
            "top": rows[:top]}  # fmt: skip


def host_markdown(rows: list[dict]) -> str:
    """Per cell with a host profile: ms of own host time per package in one step under cProfile."""
    cols = (*HOST_PACKAGES, "builtin", "other")
    out = ["| model | precision | implementation | wall under cProfile (ms) | " + " | ".join(cols) + " |",
           "| " + " | ".join(["---"] * (4 + len(cols))) + " |"]  # fmt: skip
    for r in rows:
        h = r.get("host_profile")
        if not h:
            continue
        own = h["own_ms_by_package"]
        cells = [f"{own.get(c, 0.0):.1f}" for c in cols]
        out.append(f"| {r.get('model', '')} | {r['precision']} | {r['impl']} | {h['wall_ms_cprofile']:.1f} | "
                   + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        grouped = group_trace(json.load(f))
    print(json.dumps(grouped, indent=2))

"""Throughput benchmark: llmtrain's Megatron engine against a bare Megatron-Core + TE loop, one GPU.

Models (`--model`, comma-separated, each next to the bare loop):
  proxy8b  Llama 3 8B layer shapes with 4 layers (fits one H100), vocab 128256, seq 8192, MBS 1,
           4 micro-batches per step (32,768 tokens)
  1b       the llama3_1b debug model (Llama 3.2 1B shapes, 16 layers, tied embeddings), seq 1024, MBS 4,
           4 micro-batches per step (GBS 16, 16,384 tokens), as `recipe=llama3_1b` runs in docs/benchmarks.md
Mock data (random tokens). Each (model, implementation) runs in its own process on the same GPU, its
precisions one after the other (one engine at a time: imports and start-up are paid once per process), with
the distributed optimizer and overlapped communication (parallel=megatron_8b)
in both implementations. The step time is the median of the timed steps (min-max beside it: the 1B model is
host-bound, its steps move with the host's speed), with the time Python's garbage collector ran in them, the
memory allocated between steps, and the host's speed before the timed steps (microseconds per CPU `view`). Reports tokens/s, model TFLOP/s per GPU (ModelSpec.flops_per_token:
6*N_matmul + 12*L*H*S), MFU against the dense BF16 peak, peak memory, and each precision's step time
relative to BF16. The bare loop exists for bf16 and fp8_cs (TE native); mxfp8/nvfp4 run natively on
Blackwell and emulated elsewhere (our Triton quantizers inside TE). Every quantized precision quantizes all
layers (precision.bf16_layers first=0 last=0) so the cost of quantization is not hidden.

`--profile` adds one more step per cell under torch.profiler: CUDA kernel time grouped into quantize, amax,
GEMM, attention, cast, optimizer, communication, data and other (scripts/profile_step.py); `--traces DIR`
keeps each profiled step's gzipped Chrome trace. `--kernels` adds the quantize kernels' bandwidth on an
8192x4096 BF16 tensor: bytes moved / time, against the copy bandwidth measured in the same run.

    python scripts/bench.py --model proxy8b,1b --precisions bf16,fp8_cs,mxfp8,nvfp4 --profile --kernels
    python scripts/bench.py --render bench.json > bench.md     # the markdown tables from a results file

This process never initialises CUDA (the GPU's name and the kernel timings come from child processes), so
every cell has the whole GPU. Results are written after every process (`--out`); each precision's result
reaches the parent as soon as it is measured, so a run cut short keeps what it measured.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # profile_step, also when imported from tests

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0}
NOMINAL_HBM_GBS = {"H100": 3350.0, "H200": 4800.0, "B200": 8000.0}
BARE_PRECISIONS = ("bf16", "fp8_cs")
PARALLEL = "megatron_8b"  # distributed optimizer + overlap, as the bare loop (--parallel changes llmtrain's)

# name -> model config, and the run shape: layers (None = the config's), seq, micro-batch size, micro-batches
MODELS = {
    "proxy8b": {"config": "llama3_8b", "layers": 4, "seq": 8192, "mbs": 1, "mb": 4},
    "1b": {"config": "llama3_1b", "layers": None, "seq": 1024, "mbs": 4, "mb": 4},
}


def shape_of(args, model: str) -> dict:
    """The model's run shape, with --layers/--seq/--mbs/--mb overriding it where given."""
    s = dict(MODELS[model])
    for key in ("layers", "seq", "mbs", "mb"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    return s


def overrides(shape: dict, precision: str = "bf16") -> dict:
    model = {"seq_length": shape["seq"]}
    if shape["layers"] is not None:
        model["num_layers"] = shape["layers"]
    over = {
        "model": model,
        "train": {"micro_batch_size": shape["mbs"], "global_batch_size": shape["mbs"] * shape["mb"]},
    }
    if precision != "bf16":
        over["precision"] = {"bf16_layers": {"first": 0, "last": 0}}
    return over


def make_cfg(model: str, shape: dict, precision: str = "bf16", parallel: str = PARALLEL):
    from tests.megatron_helpers import make_config

    return make_config(MODELS[model]["config"], precision, parallel, overrides(shape, precision))


def llmtrain_cell(args, precision: str) -> dict:
    """llmtrain's MegatronEngine at one precision, timed over `steps` after `warmup`, optionally profiled."""
    import torch
    from profile_step import time_steps

    from llmtrain.dist import DistInfo
    from llmtrain.engines.megatron_engine import MegatronEngine
    from llmtrain.engines.megatron_engine.batches import mock_batches
    from tests.megatron_helpers import dispose

    shape = shape_of(args, args.model)
    cfg = make_cfg(args.model, shape, precision, args.parallel)
    start = torch.cuda.memory_allocated()  # left by the previous cell: ~0 unless something leaked
    torch.cuda.reset_peak_memory_stats()
    engine = MegatronEngine(cfg, DistInfo())
    built = torch.cuda.memory_allocated()
    try:
        batches = mock_batches(shape["mb"], shape["mbs"], shape["seq"], cfg.model.vocab_size)
        counter = [0]

        def step():
            counter[0] += 1
            engine.begin_step(counter[0])
            return engine.train_step(batches, lr=3e-4)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()  # between steps: weights, grads, optimizer, caches
        results = []
        timing = time_steps(lambda: results.append(step()), args.steps)
        out = {
            "impl": "llmtrain-megatron",
            "precision": precision,
            "backend": engine.backend_description,
            **timing,
            "tokens_per_step": shape["mb"] * shape["mbs"] * shape["seq"],
            "peak_mem_gib": engine.memory_stats()["mem_gib"],
            "start_mem_gib": start / 2**30,
            "built_mem_gib": built / 2**30,
            "resident_mem_gib": resident / 2**30,
            "last_loss": results[-1].loss,
            "data": "mock (random tokens)",
        }
        if engine.emulated:  # quantizations per step by (role, direction): weights once per step
            from llmtrain.precision import te_custom

            te_custom.STATE.quantize_calls.clear()
            step()
            calls = te_custom.STATE.quantize_calls.items()
            out["quantize_calls_per_step"] = {f"{role}/{d}": n for (role, d), n in calls}
        if args.host_profile:  # host-bound cells: which package's code the host runs
            from profile_step import host_profile_one_step

            out["host_profile"] = host_profile_one_step(step)
        if args.profile:
            from profile_step import profile_one_step

            out["profile"] = profile_one_step(
                step, engine.optimizer, trace_path(args, args.model, precision, "llmtrain")
            )
        return out
    finally:
        dispose(engine)


def trace_path(args, model: str, precision: str, impl: str) -> str | None:
    """Where the profiled step's Chrome trace goes, if this cell's trace is kept (--traces and filters)."""
    keep = (not args.trace_models or model in args.trace_models.split(",")) and (
        not args.trace_precisions or precision in args.trace_precisions.split(",")
    )
    return str(Path(args.traces) / f"{model}_{precision}_{impl}.json.gz") if args.traces and keep else None


def worker_llmtrain(args) -> None:
    """One process per model: each precision in turn (one engine at a time), one result line each."""
    import gc

    import torch

    for precision in args.precisions.split(","):
        try:
            r = llmtrain_cell(args, precision)
        except Exception:  # the next precision still runs; the table shows this one failed
            r = {
                "impl": "llmtrain-megatron",
                "precision": precision,
                "error": traceback.format_exc()[-2000:],
            }
        print("BENCH_RESULT " + json.dumps(r), flush=True)
        # Here, not inside the cell: its frame (and a failed cell's traceback) no longer holds the engine.
        gc.collect()
        torch.cuda.empty_cache()


def kernel_bench() -> tuple[list[dict], dict]:
    """GB/s of fake_quantize_2d on an 8192x4096 BF16 tensor, per format and direction."""
    import torch
    import triton

    from llmtrain.precision.hadamard import TE_SIGNS
    from llmtrain.precision.triton_kernels import Direction, fake_quantize_2d, fake_quantize_2d_pair

    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    signs = torch.tensor(TE_SIGNS, device="cuda")
    nbytes = x.numel() * x.element_size()
    copy_ms = triton.testing.do_bench(lambda: out.copy_(x))
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    cases = [
        ("fp8_e4m3", 1, {}),
        ("mxfp8", 1, {}),
        ("mxfp8", 0, {}),
        ("nvfp4", 1, {}),
        ("nvfp4", 1, {"block_2d": True}),
        ("nvfp4", 0, {"block_2d": True}),
        ("nvfp4", 0, {"rht_signs": signs, "rounding": "stochastic"}),
        ("nvfp4", 1, {"rounding": "stochastic"}),
    ]
    rows = []
    for fmt, axis, kw in cases:
        ms = triton.testing.do_bench(
            lambda fmt=fmt, axis=axis, kw=kw: fake_quantize_2d(x, fmt, axis=axis, out=out, **kw)
        )
        reads = 1 if fmt == "mxfp8" else 2  # per-tensor formats read x twice: amax, then quantize
        moved = (reads + 1) * nbytes
        label = "+".join(
            [fmt, "rowwise" if axis == 1 else "columnwise"] + [k if k != "rht_signs" else "rht" for k in kw]
        )
        rows.append({"kernel": label, "ms": ms, "bytes_moved": moved, "gb_per_s": moved / ms / 1e6,
                     "fraction_of_copy_bw": moved / ms / 1e6 / copy_gbs})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    # Both layouts of one tensor from one read (weights: 16x16 tiles; activations: column-wise RHT + SR).
    pairs = [
        ("nvfp4+pair+2d", Direction("nvfp4", block_2d=True), Direction("nvfp4", block_2d=True)),
        ("nvfp4+pair+col_rht_sr", Direction("nvfp4"), Direction("nvfp4", "stochastic", rht=True, seed=1)),
        ("mxfp8+pair", Direction("mxfp8"), Direction("mxfp8")),
    ]
    for label, row, col in pairs:
        ms = triton.testing.do_bench(
            lambda row=row, col=col: fake_quantize_2d_pair(x, row, col, rht_signs=signs)
        )
        moved = (1 if row.fmt == "mxfp8" else 2) * nbytes + 2 * nbytes  # amax pass (NVFP4), read, two writes
        rows.append({"kernel": label, "ms": ms, "bytes_moved": moved, "gb_per_s": moved / ms / 1e6,
                     "fraction_of_copy_bw": moved / ms / 1e6 / copy_gbs})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows, {"copy_gb_per_s": copy_gbs, "tensor": "8192x4096 bf16"}


def _child_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    }


def gpu_name() -> str:
    """GPU 0's name, asked of a child process (this one keeps no CUDA context)."""
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "unknown"
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else "unknown"


def run_kernel_bench(args) -> tuple[dict | None, str | None]:
    """kernel_bench in a child process: (its results, None) or (None, why it gave none)."""
    cmd = [sys.executable, __file__, "--kernels-worker"]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_child_env(), timeout=args.group_timeout
        )
        out, status = proc.stdout, f"rc={proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}"
    except subprocess.TimeoutExpired as e:
        out, status = _text(e.stdout), f"timed out after {args.group_timeout:.0f}s"
    for line in out.splitlines():
        if line.startswith("BENCH_KERNELS "):
            return json.loads(line[len("BENCH_KERNELS ") :]), None
    return None, status


def bare_args(args, model: str) -> list[str]:
    """scripts/bench_bare_megatron.py's arguments for `model` (it imports nothing from llmtrain)."""
    from llmtrain.models import ModelSpec

    shape = shape_of(args, model)
    spec = ModelSpec.from_config(make_cfg(model, shape).model)
    return [
        "--layers", str(spec.num_layers), "--hidden", str(spec.hidden_size), "--ffn", str(spec.ffn_hidden_size),
        "--heads", str(spec.num_attention_heads), "--groups", str(spec.num_query_groups),
        "--kv-channels", str(spec.head_dim), "--vocab", str(spec.vocab_size), "--seq", str(shape["seq"]),
        "--mbs", str(shape["mbs"]), "--mb", str(shape["mb"]), *(["--tie"] if spec.tie_embeddings else []),
    ]  # fmt: skip


def group_command(impl: str, model: str, precisions: list[str], args) -> list[str]:
    """The process that runs `precisions` one after the other for `model` in one implementation."""
    common = ["--precisions", ",".join(precisions), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile:
        common.append("--profile")
    if args.host_profile and impl == "llmtrain":
        common.append("--host-profile")
    if args.traces:
        common += ["--traces", args.traces, "--trace-models", args.trace_models]
        common += ["--trace-precisions", args.trace_precisions]
    if impl == "llmtrain":
        shape = shape_of(args, model)
        sizes = ["--mbs", str(shape["mbs"]), "--mb", str(shape["mb"]), "--seq", str(shape["seq"])]
        if shape["layers"] is not None:
            sizes += ["--layers", str(shape["layers"])]
        return [
            sys.executable,
            __file__,
            "--worker",
            "--model",
            model,
            "--parallel",
            args.parallel,
            *sizes,
            *common,
        ]
    bare = [sys.executable, str(ROOT / "scripts" / "bench_bare_megatron.py"), "--model-name", model]
    return [*bare, *bare_args(args, model), *common]


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_group(impl: str, model: str, precisions: list[str], args) -> list[dict]:
    """One row per precision: its result line, or the error that kept it from one."""
    env = _child_env()
    cmd = group_command(impl, model, precisions, args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.group_timeout)
        stdout, stderr, status = proc.stdout, proc.stderr, f"rc={proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr, status = (
            _text(e.stdout),
            _text(e.stderr),
            f"timed out after {args.group_timeout:.0f}s",
        )
    results = {}
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            r = json.loads(line[len("BENCH_RESULT ") :])
            results[r["precision"]] = r
    tail = (stdout + stderr)[-2000:]
    return [
        {"model": model, **results[p]}
        if p in results
        else {"impl": impl, "model": model, "precision": p, "error": f"{status}: {tail}"}
        for p in precisions
    ]


def add_metrics(r: dict, flops_per_token: float, peak: float) -> dict:
    if "error" in r:
        return r
    tps = r["tokens_per_step"] / r["step_time_s"]
    tflops = tps * flops_per_token / 1e12
    return {**r, "tokens_per_s": tps, "model_tflops_per_gpu": tflops, "mfu": tflops / peak}


def model_meta(args, model: str) -> dict:
    from llmtrain.models import ModelSpec

    shape = shape_of(args, model)
    spec = ModelSpec.from_config(make_cfg(model, shape).model)
    return {
        "description": f"{MODELS[model]['config']}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"vocab {spec.vocab_size}{' (tied)' if spec.tie_embeddings else ''}, seq {shape['seq']}, "
        f"MBS {shape['mbs']}, {shape['mb']} micro-batches/step "
        f"({shape['mb'] * shape['mbs'] * shape['seq']:,} tokens)",
        "flops_per_token": spec.flops_per_token(),
        "params": spec.num_params(),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    """The throughput table per model, step times relative to BF16, the profile and the kernel table."""
    out = [
        f"GPU: {meta['gpu']}; MFU vs dense BF16 peak {meta['peak_tflops']:.0f} TFLOP/s; {meta['timing']}; "
        "data: mock (random tokens).",
    ]
    for model, mm in meta["models"].items():
        mrows = [r for r in rows if r.get("model") == model]
        out += [
            "",
            f"**{model}**: {mm['description']}; {mm['flops_per_token'] / 1e9:.3f} GFLOP/token.",
            "",
            "| precision | implementation | step time (s) | min-max (s) | tokens/s | model TFLOP/s/GPU | MFU | "
            "peak mem (GiB) | between steps (GiB) | GC (ms/step) | host op (us) | vs bare | vs BF16 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        order = list(dict.fromkeys(r["precision"] for r in mrows))
        mrows.sort(key=lambda r: order.index(r["precision"]))  # stable: llmtrain, then the bare loop
        bare = {
            r["precision"]: r for r in mrows if r.get("impl") == "bare-megatron-core" and "error" not in r
        }
        bf16 = {r["impl"]: r for r in mrows if r["precision"] == "bf16" and "error" not in r}
        for r in mrows:
            if "error" in r:
                out.append(f"| {r['precision']} | {r['impl']} | failed: {r['error'][-160:]!r} |" + " |" * 10)
                continue
            ref = bare.get(r["precision"])
            vs = f"{r['step_time_s'] / ref['step_time_s']:.3f}x time" if ref and r is not ref else ""
            base = bf16.get(r["impl"])
            rel = f"{r['step_time_s'] / base['step_time_s']:.2f}x time" if base and base is not r else ""
            spread = (
                f"{r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f}" if "step_time_min_s" in r else ""
            )  # results files from before the per-step timing have the mean only
            resident = f"{r['resident_mem_gib']:.1f}" if "resident_mem_gib" in r else ""
            gc_ms = f"{r['gc_ms_per_step']:.1f}" if "gc_ms_per_step" in r else ""
            host = f"{r['host_op_us']:.2f}" if "host_op_us" in r else ""
            out.append(
                f"| {r['precision']} | {r['impl']} | {r['step_time_s']:.3f} | {spread} | {r['tokens_per_s']:,.0f} | "
                f"{r['model_tflops_per_gpu']:.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | {resident} | "
                f"{gc_ms} | {host} | {vs} | {rel} |"
            )
    leaked = [r for r in rows if r.get("start_mem_gib", 0.0) > 0.25]
    if leaked:  # memory a previous cell of the same process left allocated counts in this cell's peak
        out += ["", "Cells that started with GPU memory still allocated by an earlier cell of their process "
                "(their peak includes it): " + ", ".join(
                    f"{r.get('model', '')} {r['precision']} {r['impl']} {r['start_mem_gib']:.1f} GiB"
                    for r in leaked) + "."]  # fmt: skip
    from profile_step import host_markdown
    from profile_step import markdown as profile_markdown

    for key, caption, table in (
        ("profile", "One profiled step per cell: CUDA kernel time in ms (share of all kernel time); wall = the "
         "profiled step's wall time (profiler overhead included), GPU busy = union of kernel and copy "
         "intervals.", profile_markdown),
        ("host_profile", "Host time of one more step under cProfile, ms of each package's own code (builtin: C "
         "functions, kernel launches and allocations among them); cProfile slows Python code, so compare "
         "cells, not with the step times above. The top functions per cell are in bench.json "
         "(`host_profile`).", host_markdown),
    ):  # fmt: skip
        if any(r.get(key) for r in rows):
            out += ["", caption, "", table(rows).rstrip("\n")]
    calls = [r for r in rows if r.get("quantize_calls_per_step")]
    if calls:
        out += [
            "",
            "Emulated quantizations in one step (llmtrain's quantizers inside TE): a weight once per step, an "
            "activation once per micro-batch.",
            "",
            "| model | precision | fprop W | dgrad W^T | fprop x | wgrad x | dgrad dy | wgrad dy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        keys = ("weight/rowwise", "weight/columnwise", "input/rowwise", "input/columnwise",
                "grad_output/rowwise", "grad_output/columnwise")  # fmt: skip
        for r in calls:
            c = r["quantize_calls_per_step"]
            out.append(
                f"| {r['model']} | {r['precision']} | " + " | ".join(str(c.get(k, 0)) for k in keys) + " |"
            )
    if kernels := meta.get("kernels"):
        hbm = meta.get("nominal_hbm_gb_per_s")
        out += [
            "",
            f"Quantize kernels on {kernels['tensor']} (copy bandwidth measured here: {kernels['copy_gb_per_s']:,.0f} GB/s"
            + (f"; nominal HBM {hbm:,.0f} GB/s" if hbm else "")
            + ")",
            "",
            "| kernel | time (us) | GB/s | vs copy | vs nominal HBM |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k in kernels["rows"]:
            nominal = f"{k['gb_per_s'] / hbm:.0%}" if hbm else ""
            out.append(
                f"| {k['kernel']} | {k['ms'] * 1e3:.0f} | {k['gb_per_s']:,.0f} | {k['fraction_of_copy_bw']:.0%} | {nominal} |"
            )
    return "\n".join(out) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernels-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="proxy8b", help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--precisions", default="bf16,fp8_cs")
    p.add_argument("--impls", default="llmtrain,bare")
    p.add_argument("--layers", type=int, default=None, help="override every model's layer count")
    p.add_argument("--seq", type=int, default=None, help="override every model's sequence length")
    p.add_argument("--mbs", type=int, default=None, help="override every model's micro-batch size")
    p.add_argument("--mb", type=int, default=None, help="override every model's micro-batches per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="profile one more step per cell")
    p.add_argument(
        "--host-profile",
        action="store_true",
        help="llmtrain cells: one more step under cProfile, host time by package (TE, Megatron, ours, ...)",
    )
    p.add_argument("--traces", default="", help="with --profile: keep gzipped Chrome traces in this folder")
    p.add_argument("--trace-models", default="", help="keep traces of these models only (default: all)")
    p.add_argument(
        "--trace-precisions", default="", help="keep traces of these precisions only (default: all)"
    )
    p.add_argument("--parallel", default=PARALLEL, help="llmtrain's parallel config (the bare loop: fixed)")
    p.add_argument("--kernels", action="store_true", help="also time the Triton quantize kernels")
    p.add_argument("--group-timeout", type=float, default=300.0, help="seconds per process")
    p.add_argument(
        "--share-process",
        action="store_true",
        help="run a model's precisions in one process per implementation (start-up paid once; later cells' "
        "peak memory then includes what earlier ones left: 2026-12-06, +18 GiB at the 8B proxy)",
    )
    p.add_argument("--out", default="bench.json")
    p.add_argument("--md", default="bench.md")
    p.add_argument("--render", default="", help="print the markdown tables of this results JSON and exit")
    args = p.parse_args(argv)
    unknown = [m for m in args.model.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--model {','.join(unknown)}: allowed values are {', '.join(MODELS)}")
    unknown = [i for i in args.impls.split(",") if i not in ("llmtrain", "bare")]
    if unknown:
        p.error(f"--impls {','.join(unknown)}: allowed values are llmtrain, bare")
    return args


def groups(args) -> list[tuple[str, str, list[str]]]:
    """(model, impl, precisions) in run order: per model, llmtrain's precisions, then the bare loop's."""
    out = []
    for model in args.model.split(","):
        for impl in args.impls.split(","):
            precisions = [p for p in args.precisions.split(",") if impl != "bare" or p in BARE_PRECISIONS]
            if not precisions:  # the bare loop runs TE's native recipes only
                continue
            if args.share_process:
                out.append((model, impl, precisions))
            else:  # what one cell leaves behind (Megatron/TE globals, cycles) never counts in the next's peak
                out.extend((model, impl, [p]) for p in precisions)
    return out


def main(argv=None):
    args = parse(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(markdown(data["results"], data["meta"]), end="")
        return
    if args.worker:
        worker_llmtrain(args)
        return
    if args.kernels_worker:
        rows, kmeta = kernel_bench()
        print("BENCH_KERNELS " + json.dumps({**kmeta, "rows": rows}), flush=True)
        return

    # This process never touches CUDA: a context here (~0.5 GiB, more with the kernel timings' cache) would
    # stay on the GPU while every cell runs in its child, and count against the cells' memory.
    gpu = gpu_name()
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in gpu), 989.0)
    models = {m: model_meta(args, m) for m in args.model.split(",")}
    meta = {
        "gpu": gpu,
        "peak_tflops": peak,
        "timing": f"step time: median of {args.steps} timed steps after {args.warmup} warm-up; llmtrain parallel={args.parallel}, "
        "bare loop: distributed optimizer + overlap",
        "models": models,
        "nominal_hbm_gb_per_s": next((v for k, v in NOMINAL_HBM_GBS.items() if k in gpu), None),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if args.traces:
        Path(args.traces).mkdir(parents=True, exist_ok=True)
    rows = []

    def save():
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        Path(args.md).write_text(markdown(rows, meta))

    if args.kernels:  # first: a run cut short by its time limit still has them
        kernels, error = run_kernel_bench(args)
        if kernels is not None:
            meta["kernels"] = kernels
        else:  # report it, still run the cells
            meta["kernels_error"] = error
        save()
    for model, impl, precisions in groups(args):
        t0 = time.perf_counter()
        for r in run_group(impl, model, precisions, args):
            r = add_metrics(r, models[model]["flops_per_token"], peak)
            print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
            rows.append(r)
        meta.setdefault("group_wall_s", {})[f"{model}/{impl}"] = time.perf_counter() - t0
        save()
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()

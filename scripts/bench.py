"""Throughput benchmark: llmtrain's Megatron engine against a bare Megatron-Core + TE loop, one GPU.

Proxy that fits one H100: Llama 3 8B layer shapes with 4 layers, vocab 128256, seq 8192, MBS 1,
`--mb` micro-batches per optimizer step, mock data (random tokens). Each (precision, implementation) runs
in its own process, one after the other on the same GPU. Reports tokens/s, model TFLOP/s per GPU
(ModelSpec.flops_per_token: 6*N_matmul + 12*L*H*S), MFU against the dense BF16 peak, peak memory, and
each precision's step time relative to BF16. The bare loop exists for bf16 and fp8_cs (TE native);
mxfp8/nvfp4 run natively on Blackwell and emulated elsewhere (our Triton quantizers inside TE); the
proxy quantizes all 4 layers (precision.bf16_layers.last=0) so the cost of quantization is not hidden.

`--kernels` adds the quantize kernels' bandwidth on an 8192x4096 BF16 tensor: bytes moved / time,
against the copy bandwidth measured on the same GPU (and the nominal HBM bandwidth).

    python scripts/bench.py --out bench.json --md bench.md                       # bf16 + fp8_cs, both impls
    python scripts/bench.py --precisions bf16,fp8_cs,mxfp8,nvfp4 --kernels       # + emulated formats
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0}
NOMINAL_HBM_GBS = {"H100": 3350.0, "H200": 4800.0, "B200": 8000.0}
BARE_PRECISIONS = ("bf16", "fp8_cs")


def proxy_overrides(args, precision: str = "bf16") -> dict:
    over = {
        "model": {"num_layers": args.layers, "seq_length": args.seq},
        "train": {"micro_batch_size": 1, "global_batch_size": args.mb},
    }
    if precision.startswith("nvfp4"):
        over["precision"] = {"bf16_layers": {"last": 0}}
    return over


def worker_llmtrain(args) -> dict:
    """One process: llmtrain's MegatronEngine on the proxy, timed over `steps` after `warmup`."""
    import torch

    from llmtrain.engines.base import DistInfo
    from llmtrain.engines.megatron_engine import MegatronEngine
    from llmtrain.engines.megatron_engine.testing import make_config

    cfg = make_config("llama3_8b", args.precision, "megatron_8b", proxy_overrides(args, args.precision))
    engine = MegatronEngine(cfg, DistInfo())
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.mb):
        t = torch.randint(0, cfg.model.vocab_size, (1, args.seq + 1), generator=gen)
        batches.append(
            {
                "tokens": t[:, :-1].contiguous(),
                "labels": t[:, 1:].contiguous(),
                "loss_mask": torch.ones(1, args.seq),
            }
        )

    def step(i):
        engine.begin_step(i + 1)
        return engine.train_step(batches, lr=3e-4)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = [step(args.warmup + i) for i in range(args.steps)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {
        "impl": "llmtrain-megatron",
        "precision": args.precision,
        "backend": engine.backend_description,
        "step_time_s": elapsed / args.steps,
        "tokens_per_step": args.mb * args.seq,
        "peak_mem_gib": engine.memory_stats()["mem_gib"],
        "last_loss": results[-1].loss,
        "data": "mock (random tokens)",
    }
    engine.close()
    return out


def kernel_bench() -> tuple[list[dict], dict]:
    """GB/s of fake_quantize_2d on an 8192x4096 BF16 tensor, per format and direction."""
    import torch
    import triton

    from llmtrain.precision.hadamard import TE_SIGNS
    from llmtrain.precision.triton_kernels import fake_quantize_2d

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
    return rows, {"copy_gb_per_s": copy_gbs, "tensor": "8192x4096 bf16"}


def run_cell(impl: str, precision: str, args) -> dict:
    common = [
        "--precision",
        precision,
        "--layers",
        str(args.layers),
        "--seq",
        str(args.seq),
        "--mb",
        str(args.mb),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if impl == "llmtrain":
        cmd = [sys.executable, __file__, "--worker", *common]
    else:
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_bare_megatron.py"), *common]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"impl": impl, "precision": precision, "error": f"rc={proc.returncode}: {tail}"}
    return json.loads(lines[-1][len("BENCH_RESULT ") :])


def add_metrics(r: dict, flops_per_token: float, peak: float) -> dict:
    if "error" in r:
        return r
    tps = r["tokens_per_step"] / r["step_time_s"]
    tflops = tps * flops_per_token / 1e12
    return {**r, "tokens_per_s": tps, "model_tflops_per_gpu": tflops, "mfu": tflops / peak}


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"Proxy: {meta['proxy']}; GPU: {meta['gpu']}; MFU vs dense BF16 peak {meta['peak_tflops']:.0f} TFLOP/s; "
        f"{meta['flops_per_token'] / 1e9:.3f} GFLOP/token; data: mock (random tokens).",
        "",
        "| precision | implementation | step time (s) | tokens/s | model TFLOP/s/GPU | MFU | peak mem (GiB) | vs bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    bare = {r["precision"]: r for r in rows if r.get("impl") == "bare-megatron-core" and "error" not in r}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['precision']} | {r['impl']} | failed: {r['error'][-200:]!r} | | | | | |")
            continue
        ref = bare.get(r["precision"])
        vs = f"{r['step_time_s'] / ref['step_time_s']:.3f}x time" if ref and r is not ref else ""
        out.append(
            f"| {r['precision']} | {r['impl']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['model_tflops_per_gpu']:.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | {vs} |"
        )
    for impl in ("llmtrain-megatron", "bare-megatron-core"):
        by = {r["precision"]: r for r in rows if r.get("impl") == impl and "error" not in r}
        if "bf16" in by:
            rel = ", ".join(
                f"{p} {r['step_time_s'] / by['bf16']['step_time_s']:.2f}x"
                for p, r in by.items()
                if p != "bf16"
            )
            if rel:
                out.append(f"\n{impl}: step time relative to BF16: {rel}")
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--precisions", default="bf16,fp8_cs")
    p.add_argument("--impls", default="llmtrain,bare")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--mb", type=int, default=8, help="micro-batches (MBS 1) per optimizer step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--md", default="bench.md")
    p.add_argument("--kernels", action="store_true", help="also time the Triton quantize kernels")
    args = p.parse_args(argv)
    if args.worker:
        print("BENCH_RESULT " + json.dumps(worker_llmtrain(args)), flush=True)
        return

    import torch

    from llmtrain.engines.megatron_engine.testing import make_config
    from llmtrain.models import ModelSpec

    spec = ModelSpec.from_config(make_config("llama3_8b", overrides=proxy_overrides(args)).model)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in gpu), 989.0)
    rows = []
    for precision in args.precisions.split(","):
        for impl in args.impls.split(","):
            if impl == "bare" and precision not in BARE_PRECISIONS:
                continue  # the bare loop runs TE's native recipes only
            r = add_metrics(run_cell(impl, precision, args), spec.flops_per_token(), peak)
            print(json.dumps(r), flush=True)
            rows.append(r)
    meta = {
        "proxy": f"Llama 3 8B shapes, {args.layers} layers, vocab {spec.vocab_size}, seq {args.seq}, MBS 1, "
        f"{args.mb} micro-batches/step, {args.steps} timed steps after {args.warmup} warm-up",
        "gpu": gpu,
        "peak_tflops": peak,
        "flops_per_token": spec.flops_per_token(),
        "params": spec.num_params(),
        "nominal_hbm_gb_per_s": next((v for k, v in NOMINAL_HBM_GBS.items() if k in gpu), None),
    }
    if args.kernels:
        krows, kmeta = kernel_bench()
        meta["kernels"] = {**kmeta, "rows": krows}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    table = markdown(rows, meta)
    Path(args.md).write_text(table)
    print(table)


if __name__ == "__main__":
    main()

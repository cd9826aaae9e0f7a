"""Throughput benchmark: llmtrain's Megatron engine against a bare Megatron-Core + TE loop, one GPU.

Proxy that fits one H100: Llama 3 8B layer shapes with 4 layers, vocab 128256, seq 8192, MBS 1,
`--mb` micro-batches per optimizer step, mock data (random tokens). Each (precision, implementation) runs
in its own process, one after the other on the same GPU. Reports tokens/s, model TFLOP/s per GPU
(ModelSpec.flops_per_token: 6*N_matmul + 12*L*H*S), MFU against the dense BF16 peak, peak memory.

    python scripts/bench.py --out bench.json --md bench.md          # bf16 + fp8_cs, both implementations
    python scripts/bench.py --precisions bf16 --impls llmtrain       # one cell
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


def proxy_overrides(args) -> dict:
    return {
        "model": {"num_layers": args.layers, "seq_length": args.seq},
        "train": {"micro_batch_size": 1, "global_batch_size": args.mb},
    }


def worker_llmtrain(args) -> dict:
    """One process: llmtrain's MegatronEngine on the proxy, timed over `steps` after `warmup`."""
    import torch

    from llmtrain.engines.base import DistInfo
    from llmtrain.engines.megatron_engine import MegatronEngine
    from llmtrain.engines.megatron_engine.testing import make_config

    cfg = make_config("llama3_8b", args.precision, "megatron_8b", proxy_overrides(args))
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
    for _ in range(args.warmup):
        engine.train_step(batches, lr=3e-4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = [engine.train_step(batches, lr=3e-4) for _ in range(args.steps)]
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
        if "bf16" in by and "fp8_cs" in by:
            out.append(
                f"\n{impl}: FP8-CS / BF16 speed-up {by['bf16']['step_time_s'] / by['fp8_cs']['step_time_s']:.2f}x"
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
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    table = markdown(rows, meta)
    Path(args.md).write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Host time of one emulated quantize call, layer by layer of the stack (issue 18).

At 1B the emulated MXFP8/NVFP4 step is host-bound: the GPU idles 440-489 ms a step against BF16's 31 ms
while the host makes ~1,150 quantize calls (docs/benchmarks.md). This says which layer of one call takes
that time, on the 1B model's shapes:

    PYTHONPATH=/opt/gpu-site:$PWD python scripts/host_cost.py --out host_cost.json --md host_cost.md

Rows, from the bottom of the stack up (kernels, directions and hybrid each include the row before):
  torch        an empty_like + copy_: two aten launches, the floor of any call
  kernels      triton_kernels.fake_quantize_2d, each direction of the role (allocations + Triton launches)
  directions   te_custom.FakeQuantizer.quantize, each direction: our wrapper (recipe lookup, seed, the
               once-per-configuration kernel check) and TE's IdentityTensor around the kernels
  hybrid       the factory's quantizer with both usages, as TE's linear calls it (HybridQuantizer, both
               directions, the hybrid tensor)
  hybrid ONE_PASS   the same with te_custom.ONE_PASS (one pair-kernel pass for both layouts)
  te_fp8_cs    TE's native Float8CurrentScalingQuantizer, both usages: TE's own cost of one call, for scale
Each row times N calls back to back, synchronising only after them: `host_us` is the time per call
until the last launch returns (the host's cost, as long as the launch queue does not fill), `wall_us` per
call after the synchronisation (the GPU's, where larger). Then cProfile over N hybrid calls of each role:
own time by function, which names what is slow.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # profile_step

ROLES = ("input", "weight", "grad_output")


def timed(call, n: int) -> dict:
    """Per-call host and wall microseconds of n calls; the error instead where the call fails (one bad row
    must not cost the others: this runs in a few minutes of borrowed GPU time)."""
    import torch

    try:
        return _timed(call, n, torch)
    except Exception as e:  # reported in the row
        return {"error": failure(e)}


def failure(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]


def _timed(call, n: int, torch) -> dict:
    for _ in range(3):  # compile and allocate outside the timing
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"host_us": host / n * 1e6, "wall_us": wall / n * 1e6}


def role_quantizer(role: str):
    from llmtrain.precision import te_custom

    q = te_custom.qfactory(type("Role", (), {"module_type": "linear", "tensor_type": role})())
    q.set_usage(rowwise=True, columnwise=True)
    return q


def kernel_calls(q, x):
    """The Triton kernel calls the hybrid quantizer `q` makes for `x`, without TE around them."""
    from llmtrain.precision import te_custom
    from llmtrain.precision.triton_kernels import fake_quantize_2d

    dirs = [(d, d.peek()) for d in (q.rowwise_quantizer, q.columnwise_quantizer)]

    def call():
        for fq, d in dirs:
            fake_quantize_2d(x, d.fmt, axis=fq.axis, rounding=d.rounding, block_2d=d.block_2d,
                             rht_signs=te_custom.STATE.rht_signs if d.rht else None, seed=1,
                             sr_bits=te_custom.STATE.recipe.sr_bits, out_dtype=x.dtype)  # fmt: skip

    return call


def measure(precision: str, shapes: dict, n: int) -> tuple[list[dict], dict]:
    from llmtrain.precision import te_custom
    from llmtrain.precision.recipe import PrecisionRecipe
    from tests.megatron_helpers import make_config

    te_custom.activate(PrecisionRecipe.from_config(make_config(precision=precision).precision), seed=0)
    rows, profiles = [], {}
    for role in ROLES:
        try:
            measured, profiles[role] = measure_role(role, shapes[role], n)
        except Exception as e:  # a setup failure (TE's quantizer, the factory) costs this role only
            measured, profiles[role] = {"setup": {"error": failure(e)}}, []
        for name, seconds in measured.items():
            rows.append(
                {"precision": precision, "row": name, "role": role, "shape": list(shapes[role]), **seconds}
            )
    return rows, profiles


def measure_role(role: str, shape, n: int) -> tuple[dict[str, dict], list[dict]]:
    """Each row's timing for this role, and cProfile's slowest functions of its hybrid call."""
    import torch
    import transformer_engine.pytorch as te
    import transformer_engine_torch as tex

    from llmtrain.precision import te_custom

    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = role_quantizer(role)
    fp8 = te.Float8CurrentScalingQuantizer(
        tex.DType.kFloat8E4M3, torch.device("cuda"), rowwise=True, columnwise=True
    )
    default = te_custom.ONE_PASS
    try:
        te_custom.ONE_PASS = False
        out = {
            "torch": timed(lambda: torch.empty_like(x).copy_(x), n),
            "kernels": timed(kernel_calls(q, x), n),
            "directions": timed(
                lambda: [d.quantize(x) for d in (q.rowwise_quantizer, q.columnwise_quantizer)], n
            ),
            "hybrid": timed(lambda: q(x), n),
        }
        te_custom.ONE_PASS = True
        out["hybrid ONE_PASS"] = timed(lambda: q(x), n)
    finally:
        te_custom.ONE_PASS = default
    out["te_fp8_cs"] = timed(lambda: fp8(x), n)
    try:
        profile = top_functions(lambda: q(x), n)
    except Exception as e:
        profile = [{"function": f"failed: {failure(e)}", "calls_per_call": 0, "own_us": 0.0, "cum_us": 0.0}]
    return out, profile


def top_functions(call, n: int, top: int = 15) -> list[dict]:
    """Own host time per call of the `top` slowest functions over n calls (profile_step's cProfile)."""
    from profile_step import host_profile_one_step

    call()  # compiled and allocated outside the profile
    prof = host_profile_one_step(lambda: [call() for _ in range(n)], top=top)
    return [{"function": r["function"], "calls_per_call": r["calls"] / n, "own_us": r["own_ms"] * 1e3 / n,
             "cum_us": r["cum_ms"] * 1e3 / n} for r in prof["top"]]  # fmt: skip


def markdown(rows: list[dict], profiles: dict) -> str:
    out = [
        "| precision | role | shape | row | host us/call | wall us/call |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        times = f"failed: {r['error']} | |" if "error" in r else f"{r['host_us']:.0f} | {r['wall_us']:.0f} |"
        out.append(
            f"| {r['precision']} | {r['role']} | {r['shape'][0]}x{r['shape'][1]} | {r['row']} | {times}"
        )
    for key, top in profiles.items():
        out += ["", f"cProfile, hybrid call as trained (te_custom.ONE_PASS), {key}: own host us per call", "",
                "| function | calls per call | own us | cumulative us |", "| --- | --- | --- | --- |"]  # fmt: skip
        out += [
            f"| `{t['function']}` | {t['calls_per_call']:g} | {t['own_us']:.1f} | {t['cum_us']:.1f} |"
            for t in top
        ]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="nvfp4,mxfp8")
    p.add_argument("--hidden", type=int, default=2048, help="the 1B model's hidden size")
    p.add_argument("--ffn", type=int, default=8192, help="the 1B model's MLP size")
    p.add_argument("--tokens", type=int, default=4096, help="micro-batch tokens (MBS 4 x seq 1024)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", default="host_cost.json")
    p.add_argument("--md", default=None)
    args = p.parse_args()
    precisions = args.precisions.split(",")
    known = sorted(f.stem for f in (ROOT / "configs" / "precision").glob("*.yaml"))
    if unknown := [x for x in precisions if x not in known]:
        print(f"error: --precisions {','.join(unknown)}: no such precision; choose from {', '.join(known)}",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: host_cost.py times GPU launches: run it on a CUDA machine with Transformer Engine",
              file=sys.stderr)  # fmt: skip
        return 2
    # An activation and its gradient are [tokens, hidden]; a weight here is fc1's [ffn, hidden].
    shapes = {"input": (args.tokens, args.hidden), "grad_output": (args.tokens, args.hidden),
              "weight": (args.ffn, args.hidden)}  # fmt: skip
    for out in (args.out, args.md):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows, profiles = [], {}
    for precision in precisions:  # the JSON rewritten after each: an interrupted run keeps what it measured
        r, prof = measure(precision, shapes, args.calls)
        rows += r
        profiles.update({f"{precision} {k}": v for k, v in prof.items()})
        Path(args.out).write_text(json.dumps({"rows": rows, "profiles": profiles}, indent=1))
    md = markdown(rows, profiles)
    if args.md:
        Path(args.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

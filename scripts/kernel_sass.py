"""SASS statistics of the Triton quantize kernels, compiled for sm_90 without a GPU.

Each case of scripts/bench.py's kernel table is compiled as that launch would be (8192x4096 BF16: ints of 1
become constants, multiples of 16 and aligned pointers get divisibility 16) with the ptxas / nvdisasm /
cuobjdump that ship in the triton wheel, and reported as: registers, stack (spills to local memory), shared
memory, SASS instructions per thread and per element, and a few opcode counts (LDL/STL: local-memory
traffic; LDS/STS/BAR: shared-memory exchanges; SHFL: lane shuffles).

These kernels are issue-bound, not memory-bound: on the H100 the times of scripts/bench.py (8 cases,
/work/.device/9) were 0.065 us per SASS instruction per thread (32 elements per thread) within 15%. So the
instructions per element of a kernel (summed over its amax and quantize passes) predict its speed, as
long as the registers per thread stay moderate: NVFP4 row-wise stochastic rounding on the pair kernel had
fewer instructions per element than on the row kernel (45.5 vs 54.5) but 187 registers a thread (116) and
ran slower on the H100 (147 us on 2026-12-07; the row kernel 106 us on 2026-12-06). Check `regs` before
trusting a lower count.

    PYTHONPATH=$PWD python scripts/kernel_sass.py [case ...]
"""

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from llmtrain.precision import triton_kernels as K

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
TARGET = GPUTarget("cuda", 90, 32)
R, C = 8192, 4096
BF16 = torch.zeros(16, dtype=torch.bfloat16)
F32 = torch.zeros(16, dtype=torch.float32)


def compile_stats(fn, args: dict, consts: dict, num_warps: int) -> dict:
    """Compile fn for sm_90 specialized like a launch with `args` (do_not_specialize honoured); its SASS
    statistics."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in consts and name not in args:
            consts = {**consts, name: fn.params[i].default}
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
            continue
        specialize = not fn.params[i].do_not_specialize
        ty, spec = native_specialize_impl(BaseBackend, args[name], False, specialize, specialize)
        if ty == "constexpr":
            sig[name], constexprs[(i,)] = "constexpr", spec
            continue
        sig[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 3})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        res = subprocess.run(
            [f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ops = collections.Counter(
        op.split(".")[0]
        for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    )
    stats = {"regs": int(usage[1]), "stack": int(usage[2]), "smem": kernel.metadata.shared}
    stats["instr"] = sum(ops.values())
    stats.update({op: ops[op] for op in ("LDL", "STL", "LDS", "STS", "BAR", "SHFL", "LDG", "STG")})
    return stats


def _args(**seeds) -> dict:
    args = dict(x_ptr=BF16, out_ptr=BF16, row_ptr=BF16, col_ptr=BF16, signs_ptr=F32, amax_ptr=F32,
                R=R, C=C, stride_r=C, stride_c=1, seed=0, seed_row=0, seed_col=0)  # fmt: skip
    return {**args, **seeds}


def _row_kernels(fmt: str, stochastic: bool = False, **kw) -> list:
    """(kernel, args, consts, warps, elements per thread) of fake_quantize_2d's row-wise kernel launch."""
    block = K.BLOCKS.get(fmt, 16)
    br, bc = K._row_tile(block, False)
    consts = dict(FMT=K.FORMAT_IDS[fmt], BLOCK=block, BLOCK_2D=False, RHT=False, STOCHASTIC=stochastic,
                  SR_BITS=8, BR=br, BC=bc, NATIVE=True, **kw)  # fmt: skip
    out = [(K._fake_quant_kernel, _args(), consts, 4, br * bc / 128)]
    if fmt != "mxfp8":
        amax = dict(BR=br, BC=bc, RHT=False, NATIVE=True)
        out.insert(0, (K._amax_kernel, _args(), amax, 4, br * bc / 128))
    return out


def _pair_kernels(row, col, seed_col=0) -> list:
    """The same for _launch_pair(x, row, col) (the routing of _axis_free included)."""
    col_same = False
    if col is not None and K._axis_free(col):
        if row is None:
            row, col = col, None
        elif replace(row, seed=0) == replace(col, seed=0):
            col_same, col = True, None
    tile = K._pair_layout(BF16, col)
    warps = tile.pop("num_warps")
    per_thread = tile["TM"] * tile["TN"] / (32 * warps)

    def consts(p, d):
        if d is None:
            return {f"{p}_FMT": -1, f"{p}_BLOCK": 16, f"{p}_2D": False, f"{p}_RHT": False, f"{p}_SR": False}
        return {f"{p}_FMT": K.FORMAT_IDS[d.fmt], f"{p}_BLOCK": K.BLOCKS.get(d.fmt, 16),
                f"{p}_2D": d.block_2d and d.fmt in K.BLOCKS, f"{p}_RHT": d.rht,
                f"{p}_SR": d.rounding == "stochastic"}  # fmt: skip

    q = {
        **consts("ROW", row),
        **consts("COL", col),
        "SR_BITS": 8,
        "COL_SAME": col_same,
        "NATIVE": True,
        **tile,
    }
    out = [(K._fake_quant_pair_kernel, _args(seed_col=seed_col), q, warps, per_thread)]
    need_row = row is not None and row.fmt != "mxfp8"
    need_col = col is not None and col.fmt != "mxfp8"
    if need_row or need_col:
        a = dict(ROW=need_row, ROW_RHT=need_row and row.rht, COL=need_col, COL_RHT=need_col and col.rht,
                 NATIVE=True, **tile)  # fmt: skip
        out.insert(0, (K._amax_pair_kernel, _args(), a, warps, per_thread))
    return out


def _single(fmt, axis, block_2d=False, rht=False, rounding="nearest") -> list:
    """fake_quantize_2d's launches, as it routes them."""
    d = K.Direction(fmt, rounding, block_2d, rht, 0)
    route = K.launch_route(d, axis)
    if route == "pair_col":
        return _pair_kernels(None, d)
    if route == "pair_row":
        return _pair_kernels(d, None)
    return _row_kernels(fmt, stochastic=rounding == "stochastic")


D = K.Direction
CASES = {  # scripts/bench.py's kernel table
    "fp8_e4m3+rowwise": lambda: _single("fp8_e4m3", 1),
    "mxfp8+rowwise": lambda: _single("mxfp8", 1),
    "mxfp8+columnwise": lambda: _single("mxfp8", 0),
    "nvfp4+rowwise": lambda: _single("nvfp4", 1),
    "nvfp4+rowwise+block_2d": lambda: _single("nvfp4", 1, block_2d=True),
    "nvfp4+columnwise+block_2d": lambda: _single("nvfp4", 0, block_2d=True),
    "nvfp4+columnwise+rht+rounding": lambda: _single("nvfp4", 0, rht=True, rounding="stochastic"),
    "nvfp4+rowwise+rounding": lambda: _single("nvfp4", 1, rounding="stochastic"),
    "nvfp4+pair+2d": lambda: _pair_kernels(D("nvfp4", block_2d=True), D("nvfp4", block_2d=True)),
    "nvfp4+pair+col_rht_sr": lambda: _pair_kernels(D("nvfp4"), D("nvfp4", "stochastic", rht=True, seed=1), 1),
    "mxfp8+pair": lambda: _pair_kernels(D("mxfp8"), D("mxfp8")),
}


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        total = 0.0
        for fn, args, consts, warps, per_thread in CASES[name]():
            s = compile_stats(fn, args, consts, warps)
            total += s["instr"] / per_thread
            print(
                f"{name:32s} {fn.__name__:24s} warps {warps} instr/elt {s['instr'] / per_thread:5.1f} {json.dumps(s)}"
            )
        print(f"{name:32s} {'total':24s} instr/elt {total:5.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

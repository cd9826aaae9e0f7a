"""Launch a Triton kernel's compiled binary directly once Triton has compiled it for these arguments.

`fn[grid](*args, **meta)` spends ~20-60 us of host time per launch in Triton's Python path (binding and
specializing every argument, the cache key, the launch metadata: scripts/host_cost.py on an H100), which
the 1B model's emulated step pays ~2,300 times (docs/benchmarks.md). `launch` makes the first launch of a
configuration through that path, keeps the CompiledKernel Triton returns, and later launches call its
launcher with the same arguments, as Triton's own `run` does after its cache hit (torch inductor does the
same). The key holds everything Triton specializes a kernel on, conservatively: the constexprs and
launch options, each tensor's dtype and 16-byte alignment, each integer's width class and divisibility by
16 (and whether it is 1). So a launch reuses a binary only where Triton would have picked the same one.

Triton's path is kept where this one could differ from it: the CPU interpreter (TRITON_INTERPRET=1, CI),
CPU tensors, launch or pre-run hooks (Triton's profiler sets them and wants their metadata), and Triton's
debug and instrumentation modes (part of its cache key, not of ours). Not repeated per launch: Triton's
check that a global a kernel reads has not changed since it was compiled (ours read only constexprs).
"""

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# (kernel, device, constexprs and options, argument specializations) -> (launcher, function, packed
# metadata, the constexpr values after the runtime arguments in the kernel's signature)
_binaries: dict[tuple, tuple] = {}


def _specialization(a) -> tuple:
    """What Triton's binder may specialize an argument on (triton.runtime.jit.create_function_from_signature:
    a tensor's dtype and alignment; an int's type by range, == 1 and % 16), or the value itself."""
    if hasattr(a, "data_ptr"):  # a tensor (Triton tells them apart the same way)
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return int, a == 1, a % 16 == 0, -(2**31) <= a < 2**31, a < 2**63
    return type(a), a


def _constexpr_tail(fn: JITFunction, n_args: int, meta: dict) -> tuple:
    """The values of the kernel's parameters after the first n_args (all constexprs here), in signature
    order, defaults included: the launcher takes every parameter, as Triton's `run` passes them."""
    tail = []
    for p in fn.params[n_args:]:
        if not p.is_constexpr:
            raise TypeError(f"{fn.fn.__name__}: parameter {p.name} is not a constexpr; pass it positionally")
        tail.append(meta.get(p.name, p.default))
    return tuple(tail)


def _tritons_path_only(fn) -> bool:
    """Whether a launch hook or a pre-run hook is set (Triton 3.6 keeps an empty HookChain for each launch
    hook, which its own path calls twice per launch with metadata built for it), or a debug or
    instrumentation mode is on."""
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (
        any(h is not None and getattr(h, "calls", True) for h in hooks)
        or bool(fn.pre_run_hooks)
        or bool(knobs.runtime.debug)
        or bool(knobs.compilation.instrumentation_mode)
    )


def launch(fn, grid: tuple, args: tuple, meta: dict) -> None:
    """fn[grid](*args, **meta): `args` the runtime arguments (the kernel's leading parameters), `meta` its
    constexprs and launch options (num_warps, ...)."""
    if not isinstance(fn, JITFunction) or not args[0].is_cuda or _tritons_path_only(fn):
        fn[grid](*args, **meta)
        return
    device = driver.active.get_current_device()
    key = (fn, device, tuple(meta.items()), tuple(map(_specialization, args)))
    binary = _binaries.get(key)
    if binary is None:
        tail = _constexpr_tail(fn, len(args), meta)  # a misuse fails before anything runs
        kernel = fn[grid](*args, **meta)  # Triton's path: compiles (or loads) the kernel and launches it
        if kernel is None:  # Triton's jit_cache_hook skipped the compilation: nothing to keep
            return
        if hasattr(kernel, "result"):  # an asynchronous compilation's future
            kernel = kernel.result()
        _binaries[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
        return
    run, function, packed_metadata, tail = binary
    grid = (*grid, 1, 1)
    run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), function, packed_metadata, None,
        None, None, *args, *tail)  # fmt: skip


def direct_launches() -> int:
    """How many configurations have a binary kept for direct launches (tests)."""
    return len(_binaries)

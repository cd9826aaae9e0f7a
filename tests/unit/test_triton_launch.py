"""triton_launch: a kept binary is reused only where Triton's own binder would pick the same one, and a
direct launch hands the launcher what Triton's own `JITFunction.run` hands it (run here on the CPU with
Triton's compiler and GPU driver replaced by fakes; natively: test_triton_kernels.py's
test_repeated_launches_of_one_configuration_stay_bit_exact and the other bit-exactness tests)."""

import itertools
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime import jit  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from llmtrain.precision import triton_launch  # noqa: E402

INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 16,
        2**63 - 16, 2**63 - 1, 2**63, 2**64 - 16]  # fmt: skip


def _triton(a):
    return native_specialize_impl(BaseBackend, a, False, True, True)


def test_equal_keys_mean_equal_triton_specializations():
    for a, b in itertools.combinations(INTS, 2):
        if triton_launch._specialization(a) == triton_launch._specialization(b):
            assert _triton(a) == _triton(b), (a, b)
    base = torch.zeros(64, dtype=torch.bfloat16)
    tensors = [base, base[1:], base[8:], base[16:], base.float(), base.float()[4:], base.float()[1:]]
    for a, b in itertools.combinations(tensors, 2):
        if triton_launch._specialization(a) == triton_launch._specialization(b):
            assert _triton(a) == _triton(b)
    assert triton_launch._specialization(base) != triton_launch._specialization(base[1:])


def _kernel(x_ptr, n, seed, A: triton.language.constexpr, B: triton.language.constexpr = 7):
    pass


class _Compiled:
    """What Triton's compiler returns, reduced to what a launch reads; its launcher records its arguments."""

    function, packed_metadata = "function", "packed"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return None


class _Cuda:
    """A tensor-like argument on a GPU (the CPU test machine has none)."""

    is_cuda, dtype = True, torch.bfloat16

    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 99

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def gpu(monkeypatch):
    """Triton's real JITFunction.run (binder, cache, launch) over a fake driver and compiler: returns the
    list each launcher call's arguments land in and how many compilations ran."""
    calls, compiled = [], []

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled.append(key)
        kernel = self.device_caches[device][0][key] = _Compiled(calls)
        return kernel

    driver = SimpleNamespace(active=_Driver())
    monkeypatch.setattr(jit, "driver", driver)
    monkeypatch.setattr(triton_launch, "driver", driver)
    monkeypatch.setattr(JITFunction, "_do_compile", do_compile)
    monkeypatch.setattr(triton_launch, "_binaries", {})
    return calls, compiled


def test_a_direct_launch_passes_what_tritons_own_launch_passes(gpu):
    calls, compiled = gpu
    fn = JITFunction(_kernel)
    x, meta = _Cuda(4096), dict(A=3, num_warps=2)
    fn[(3, 2)](x, 100, 5, **meta)  # Triton's own launch, for reference
    triton_launch.launch(fn, (3, 2), (x, 100, 5), meta)  # first of its key: through Triton
    triton_launch.launch(fn, (3, 2), (x, 100, 5), meta)  # direct
    assert len(calls) == 3 and len(compiled) == 1
    tritons, direct = calls[0], calls[2]
    # Same grid (padded to 3-D), stream, binary and parameters (the constexprs in signature order, defaults
    # included; num_warps is an option). Only the hook slots differ: Triton passes its hook chains, empty
    # here, where the launcher then calls nothing; the direct launch passes None, which it skips.
    assert direct[:7] == tritons[:7] == (3, 2, 1, 99, "function", "packed", None)
    assert direct[9:] == tritons[9:] == (x, 100, 5, 3, 7)
    assert direct[7:9] == (None, None) and not any(h.calls for h in tritons[7:9])


def test_a_binary_is_reused_only_where_triton_reuses_it(gpu):
    calls, compiled = gpu
    fn = JITFunction(_kernel)
    meta = dict(A=1, num_warps=2)
    launches = [
        (_Cuda(4096), 100, 5),
        (_Cuda(8192), 100, 37),  # the same specialization: direct
        (_Cuda(8192 + 2), 100, 37),  # not 16-byte aligned: another binary
        (_Cuda(4096), 100, 16),  # an integer divisible by 16
        (_Cuda(4096), 1, 5),  # an integer equal to 1
        (_Cuda(4096), 100, 2**40 + 3),  # a 64-bit integer
        (_Cuda(512), 116, 2**40 + 5),  # the same classes as the one before: direct
    ]
    for args in launches:
        triton_launch.launch(fn, (4,), args, meta)
    direct = [c[7] is None for c in calls]
    assert direct == [False, True, False, False, False, False, True]
    assert len(compiled) == 5 == triton_launch.direct_launches()  # Triton compiled once per binary kept
    triton_launch.launch(fn, (4,), (_Cuda(4096), 100, 5), dict(A=2, num_warps=2))  # another constexpr
    triton_launch.launch(fn, (4,), (_Cuda(4096), 100, 5), dict(A=1, num_warps=4))  # another option
    assert len(compiled) == 7 and [c[7] is None for c in calls[-2:]] == [False, False]


def test_cpu_tensors_hooks_and_debug_modes_keep_tritons_path(gpu, monkeypatch):
    fn = JITFunction(_kernel)
    seen = []
    monkeypatch.setattr(
        JITFunction, "__getitem__", lambda self, grid: lambda *a, **m: seen.append(a) or _Compiled([])
    )
    triton_launch.launch(fn, (1,), (torch.zeros(4), 4, 5), dict(A=1))  # a CPU tensor
    triton_launch.launch(fn, (1,), (torch.zeros(4), 4, 5), dict(A=1))
    assert len(seen) == 2 and triton_launch.direct_launches() == 0

    class Interpreted:  # TRITON_INTERPRET=1: triton.jit gives no JITFunction
        def __getitem__(self, grid):
            return lambda *a, **m: seen.append(a)

    triton_launch.launch(Interpreted(), (1,), (_Cuda(4096), 4, 5), dict(A=1))
    assert len(seen) == 3 and triton_launch.direct_launches() == 0

    assert not triton_launch._tritons_path_only(fn)  # Triton's defaults: empty hook chains, no modes
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)  # how Triton's profiler registers
    try:
        assert triton_launch._tritons_path_only(fn)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    for knob, attr, value in (
        (knobs.runtime, "debug", True),
        (knobs.compilation, "instrumentation_mode", "fpsan"),
    ):
        with monkeypatch.context() as m:
            m.setattr(knob, attr, value)
            assert triton_launch._tritons_path_only(fn)
    fn.pre_run_hooks.append(lambda *a, **k: None)
    assert triton_launch._tritons_path_only(fn)


def test_a_compilation_skipped_by_tritons_cache_hook_keeps_nothing(gpu, monkeypatch):
    fn = JITFunction(_kernel)
    monkeypatch.setattr(JITFunction, "__getitem__", lambda self, grid: lambda *a, **m: None)
    triton_launch.launch(fn, (1,), (_Cuda(4096), 4, 5), dict(A=1))
    assert triton_launch.direct_launches() == 0


def test_a_runtime_parameter_after_the_arguments_given_is_refused_before_any_launch(gpu):
    calls, compiled = gpu
    with pytest.raises(TypeError, match="seed is not a constexpr"):
        triton_launch.launch(JITFunction(_kernel), (1,), (_Cuda(4096), 4), dict(A=1))
    assert calls == [] and compiled == []

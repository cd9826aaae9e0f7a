"""triton_launch: a kept binary is reused only where Triton's own binder would pick the same one, and the
launcher gets every parameter in signature order (the GPU side: test_triton_kernels.py's
test_repeated_launches_of_one_configuration_stay_bit_exact, natively)."""

import itertools
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
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
    function, packed_metadata = "function", "packed"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(("direct", args))


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


def test_first_launch_goes_through_triton_later_ones_straight_to_the_launcher(monkeypatch):
    fn = JITFunction(_kernel)
    calls = []

    def triton_path(self, grid):
        def go(*args, **meta):
            calls.append(("triton", grid, args, meta))
            return _Compiled(calls)

        return go

    monkeypatch.setattr(JITFunction, "__getitem__", triton_path)
    monkeypatch.setattr(triton_launch, "driver", SimpleNamespace(active=_Driver()))
    monkeypatch.setattr(triton_launch, "_binaries", {})
    x = _Cuda(4096)
    triton_launch.launch(fn, (3, 2), (x, 100, 5), dict(A=1, num_warps=2))
    y = _Cuda(8192)
    triton_launch.launch(fn, (4,), (y, 100, 37), dict(A=1, num_warps=2))  # same specialization
    triton_launch.launch(fn, (4,), (_Cuda(8192 + 2), 100, 37), dict(A=1, num_warps=2))  # not aligned
    triton_launch.launch(fn, (4,), (x, 100, 16), dict(A=1, num_warps=2))  # seed divisible by 16
    triton_launch.launch(fn, (4,), (x, 100, 5), dict(A=2, num_warps=2))  # another constexpr
    assert [c[0] for c in calls] == ["triton", "direct", "triton", "triton", "triton"]
    direct = calls[1][1]
    # grid padded to 3-D, the stream, the binary, no launch metadata or hooks, then every parameter:
    # the runtime arguments and the constexprs in signature order, defaults included (num_warps is an option)
    assert direct[:9] == (4, 1, 1, 99, "function", "packed", None, None, None)
    assert direct[9] is y and direct[10:] == (100, 37, 1, 7)
    assert triton_launch.direct_launches() == 4


def test_cpu_tensors_and_interpreted_kernels_keep_tritons_path(monkeypatch):
    calls = []

    class Interpreted:
        def __getitem__(self, grid):
            return lambda *a, **m: calls.append((grid, a, m))

    monkeypatch.setattr(triton_launch, "_binaries", {})
    triton_launch.launch(Interpreted(), (1,), (torch.zeros(4), 4), dict(A=1))
    triton_launch.launch(Interpreted(), (1,), (torch.zeros(4), 4), dict(A=1))
    assert len(calls) == 2 and triton_launch.direct_launches() == 0


def test_a_runtime_parameter_after_the_arguments_given_is_refused():
    with pytest.raises(TypeError, match="seed is not a constexpr"):
        triton_launch._constexpr_tail(JITFunction(_kernel), 2, dict(A=1))


def test_a_launch_hook_keeps_tritons_path(monkeypatch):
    from triton import knobs

    assert not triton_launch._hooked()  # Triton's default: empty hook chains
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    assert triton_launch._hooked()

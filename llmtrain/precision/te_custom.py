"""llmtrain's quantizers inside Transformer Engine: the `precision.backend=custom` path of the Megatron engine.

TE's `CustomRecipe(qfactory=...)` asks a factory for one quantizer per tensor slot of every TE linear
(roles: input, weight, grad_output; outputs and grad-inputs stay high precision). The factory here
answers from the active PrecisionRecipe with a `HybridQuantizer` whose two directions are
`FakeQuantizer`s: each holds the tensor quantized-then-dequantized by the Triton kernels (the torch
reference for a format without a kernel, e.g. MXFP4: emulate.py), blocked along the axis its GEMM
reduces over:

    input        row-wise (fprop x, blocks along features)   column-wise (wgrad x, along tokens, RHT)
    weight       row-wise (fprop W, along in_features)       column-wise (dgrad W, along out_features)
    grad_output  row-wise (dgrad dy, along out_features)     column-wise (wgrad dy, along tokens, RHT)

TE then runs plain BF16 cuBLAS GEMMs on those values (its general_gemm unwraps hybrid/identity tensors),
so gradient accumulation fusion, TP/SP communication and FP32 main grads work unchanged. The emulated
GEMM therefore sees BF16 operands: exact for MXFP8 and for an NVFP4 element times its E4M3 block scale;
the FP32 per-tensor factor (NVFP4 amax/2688, FP8 1/scale) adds one BF16 rounding per element (<= 2**-9
relative; about half of the BF16 GEMM outputs then differ from TE's native GEMM by an ulp or more, see
docs/precision.md), small against the formats' own steps. The RHT is applied to both wgrad operands along
the token axis, which leaves dW = dy^T x unchanged (the transform is orthogonal), as in TE's NVFP4 recipe.

Weights are quantized once per optimizer step, not per micro-batch, by TE itself: Megatron-Core passes
`is_first_microbatch` to TE's linears, and TE then keeps the weight's quantized workspace (our
HybridQuantizer's output) in `module._fp8_workspaces["weight"]` and refreshes it only on the first
micro-batch of each forward-backward call (`quantize_weight(update_workspace=is_first_microbatch)`, via
`update_quantized`, which here writes the fake-quantized values straight into the cached buffer). Keying a
cache of our own on `param._version` would not work on this engine: the distributed optimizer writes new
weights through `.data` views of its parameter buffer, which bump no parameter's version counter.
A stochastically rounded weight (sr_operands=all) is thus drawn once per forward-backward call, as TE does
for any weight quantizer. `STATE.quantize_calls` counts quantizations per (tensor role, direction), so a
test and the profiler can see it.

Phases (precision.schedule): every quantizer looks its operand up in `STATE.recipe` when it quantizes,
so `set_recipe` switches every TE linear at once; an operand in high precision passes through. The
monitor's `STATE.qaf` (set only while it probes) passes the backward directions (column-wise input and
weight, both grad_output directions) through in high precision, the forward stays quantized.

Megatron-Core finds the factory by its dotted path `llmtrain.precision.te_custom.qfactory`
(TransformerConfig.fp4_quantizer_factory / fp8_quantizer_factory); the engine calls `activate()` with
the run's PrecisionRecipe before building the model (te_recipes.start_emulation). Imported only on a CUDA
machine with TE.
"""

import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import transformer_engine.pytorch  # noqa: F401  (TE's torch extension before its submodules)
from transformer_engine.pytorch.tensor.hybrid_tensor import HybridQuantizer
from transformer_engine.pytorch.tensor.identity_tensor import IdentityQuantizer

from llmtrain.precision.emulate import fake_quantize_2d
from llmtrain.precision.hadamard import TE_SIGNS, hadamard, random_signs
from llmtrain.precision.recipe import Operand, PrecisionRecipe
from llmtrain.precision.registry import get_format
from llmtrain.precision.switches import switch
from llmtrain.precision.triton_kernels import Direction, fake_quantize_2d_pair, one_quantization_serves_both


@dataclass
class EmulationState:
    """What every FakeQuantizer of this process reads at quantize time."""

    recipe: PrecisionRecipe | None = None
    seed: int = 0
    qaf: bool = False
    step: int = 0
    calls: int = 0  # quantize calls with stochastic rounding in this step (seeds stay reproducible)
    rht_signs: torch.Tensor = field(default_factory=lambda: torch.tensor(TE_SIGNS))
    quantize_calls: Counter = field(default_factory=Counter)  # (role, "rowwise"|"columnwise") -> calls
    one_pass_calls: int = 0  # of those, pairs made by one pass (GatheredHybridQuantizer, ONE_PASS)

    def next_seed(self) -> int:
        self.calls += 1
        key = f"{self.seed}/{self.step}/{self.calls}".encode()
        return zlib.crc32(key) & 0x7FFFFFFF


STATE = EmulationState()


def activate(recipe: PrecisionRecipe, seed: int) -> None:
    """Use `recipe` for every quantizer the factory makes from now on (call before building the model)."""
    STATE.recipe, STATE.seed, STATE.qaf, STATE.step, STATE.calls = recipe, int(seed), False, 0, 0
    if recipe.rht_signs == "random":
        signs = random_signs(recipe.rht_size, torch.Generator().manual_seed(int(seed) + 1))
    else:
        signs = torch.tensor(TE_SIGNS)
    STATE.rht_signs = signs.to(torch.cuda.current_device())  # once, not a host copy per quantize call


def begin_step(step: int) -> None:
    """Stochastic-rounding seeds derive from (run seed, step, call index): a resumed run draws the same."""
    STATE.step, STATE.calls = int(step), 0


def set_qaf(active: bool) -> None:
    STATE.qaf = bool(active)


def set_recipe(recipe: PrecisionRecipe) -> None:
    """A precision phase starts: every quantizer reads `recipe` from its next quantize call on."""
    STATE.recipe = recipe


class FakeQuantizer(IdentityQuantizer):
    """One GEMM direction of one tensor: holds fake_quantize_2d(tensor) in the tensor's dtype, as the
    operand `name` of the active recipe says (its value when quantizing, so a phase switch applies)."""

    def __init__(self, name: str, axis: int, *, backward: bool = False, role: str = ""):
        super().__init__()
        self.name, self.axis, self.backward, self.role = name, axis, backward, role
        # Tensor results (IdentityTensor), not storage-only ones: TE's HybridQuantizedTensor.detach() refuses
        # an IdentityTensorStorage sub-storage ("does not support storage-only rowwise sub-storage"), which
        # broke every emulated MXFP8/NVFP4 Megatron step when this was True (H100, 2026-12-07).
        self.internal = False
        self.ready: torch.Tensor | None = None  # this call's result, when the hybrid made both at once

    @property
    def operand(self) -> Operand:
        return getattr(STATE.recipe, self.name)

    @property
    def rht(self) -> bool:
        return self.name in ("wgrad_x", "wgrad_dy") and STATE.recipe.rht

    @property
    def _passes_through(self) -> bool:
        # The monitor's QAF pass (backward in high precision), or an operand the active phase leaves in BF16.
        return (self.backward and STATE.qaf) or not self.operand.quantized

    def is_requantization_safe(self) -> bool:
        # Stochastic rounding draws new bits on every call: quantizing again does not give the same tensor.
        return self._passes_through or self.operand.rounding != "stochastic"

    def copy(self) -> "FakeQuantizer":
        q = FakeQuantizer(self.name, self.axis, backward=self.backward, role=self.role)
        q.rowwise_usage, q.columnwise_usage = self.rowwise_usage, self.columnwise_usage
        q.internal, q.optimize_for_gemm = self.internal, self.optimize_for_gemm
        return q

    def update_quantized(self, src, dst, *, noop_flag=None):
        """Refresh TE's cached weight workspace: fake-quantize into its buffer, no temporary + copy."""
        hp = getattr(dst, "_hp_data", None)
        if noop_flag is None and hp is not None and _same_storage(hp, src):
            # A workspace made while QAF passed the weight through aliases the parameter (its buffer):
            # writing quantized values into it would overwrite the weights. Replace it instead.
            dst._hp_data = self._maybe_cast(src)
            return dst
        if noop_flag is None and self._writes_into(src, hp):
            self._maybe_cast(src, into=hp)
            return dst
        return super().update_quantized(src, dst, noop_flag=noop_flag)

    def _writes_into(self, src: torch.Tensor, hp: torch.Tensor | None) -> bool:
        """Whether quantizing `src` can write straight into the cached buffer `hp`."""
        return (
            hp is not None
            and hp.is_contiguous()
            and src.is_contiguous()
            and (hp.shape, hp.dtype, hp.device) == (src.shape, src.dtype, src.device)
            and not _same_storage(hp, src)
            and not self._passes_through
        )

    def _check_tokens(self, x2: torch.Tensor) -> None:
        if self.rht and not (self.backward and STATE.qaf) and x2.shape[0] % STATE.recipe.rht_size:
            raise ValueError(
                f"the random Hadamard transform needs a token count divisible by {STATE.recipe.rht_size}, "
                f"got {x2.shape[0]}; use a sequence length (x micro-batch size) that is a multiple of "
                f"{STATE.recipe.rht_size}, or precision.rht=false"
            )

    def peek(self, seed: int = 0) -> Direction:
        """This call's Direction with `seed` (plan draws it): neither counts the call nor draws a seed."""
        op = self.operand
        return Direction(op.fmt, op.rounding, op.block_2d, rht=self.rht, seed=seed)

    def plan(self) -> Direction:
        """This quantize call's Direction: counts the call and draws its stochastic-rounding seed (one
        Direction built per call, no copy: this runs ~1,150 times a 1B step, which is host-bound)."""
        STATE.quantize_calls[(self.role, "columnwise" if self.axis == 0 else "rowwise")] += 1
        return self.peek(STATE.next_seed() if self.operand.rounding == "stochastic" else 0)

    def _maybe_cast(self, tensor: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        data = tensor.detach()
        if self.ready is not None:  # made by the hybrid's one pass over both layouts (quantize_impl)
            out, self.ready = self.ready, None
            return out.view(data.shape)
        x2 = data.reshape(-1, data.shape[-1])
        self._check_tokens(x2)
        if self._passes_through:
            if self.rht and not STATE.qaf:
                # This wgrad operand stays in BF16 while the other one is quantized after the transform:
                # it must be transformed too, or dW = dy^T (H x) (the torch engine transforms both).
                t = hadamard(x2.t(), STATE.recipe.rht_size, STATE.rht_signs)
                return t.t().contiguous().view(data.shape)
            return super()._maybe_cast(tensor)
        d = self.plan()
        # The Triton kernels, or the torch reference for a format without one (emulate.py).
        out = fake_quantize_2d(
            x2, d.fmt, axis=self.axis, rounding=d.rounding, block_2d=d.block_2d,
            rht_signs=STATE.rht_signs if d.rht else None, seed=d.seed, sr_bits=STATE.recipe.sr_bits,
            out_dtype=data.dtype, out=None if into is None else into.view(x2.shape),
        )  # fmt: skip
        return out.view(data.shape)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _direction(name: str, axis: int, *, backward: bool = False, role: str = ""):
    # A FakeQuantizer even for a high-precision operand: a later phase may quantize it.
    return FakeQuantizer(name, axis, backward=backward, role=role)


def qfactory(role):
    """TE CustomRecipe factory: one quantizer per (module, tensor) slot, from the active recipe."""
    r = STATE.recipe
    tensor_type = getattr(role, "tensor_type", "") if role is not None else ""
    linear = role is not None and getattr(role, "module_type", "") in ("linear", "grouped_linear")
    if r is None:
        raise RuntimeError(
            "llmtrain.precision.te_custom.activate(recipe, seed) must run before the model is built"
        )
    if not linear or tensor_type not in ("input", "weight", "grad_output"):
        return IdentityQuantizer()
    t = tensor_type
    if t == "input":
        row, col = _direction("fprop_x", 1, role=t), _direction("wgrad_x", 0, backward=True, role=t)
    elif t == "weight":
        row, col = _direction("fprop_w", 1, role=t), _direction("dgrad_w", 0, backward=True, role=t)
    else:
        row = _direction("dgrad_dy", 1, backward=True, role=t)
        col = _direction("wgrad_dy", 0, backward=True, role=t)
    return GatheredHybridQuantizer(rowwise_quantizer=row, columnwise_quantizer=col)


class GatheredHybridQuantizer(HybridQuantizer):
    """A HybridQuantizer that TE treats as custom (`tensor.utils.is_custom`): with sequence parallelism,
    TE 2.20 then all-gathers the input in BF16 and quantizes the gathered tensor once, as the torch engine
    does. Otherwise (Linear/LayerNormLinear) it quantizes each rank's shard, falls back to a high-precision
    gather of the dequantized shard and quantizes again: the input rounded twice, RHT applied twice.

    With ONE_PASS, where TE asks for both layouts of a tensor in one call (weights; grad_output; inputs
    without sequence parallelism), one pair-kernel pass reads the tensor once and writes both
    (triton_kernels.fake_quantize_2d_pair), the same values bit for bit as two calls: the seeds are drawn
    in the order of TE's two calls (row-wise first). TE still builds the hybrid tensor: each
    FakeQuantizer hands out its precomputed result (`ready`)."""

    custom = True

    def copy(self) -> "GatheredHybridQuantizer":
        q = super().copy()  # TE's copy builds a plain HybridQuantizer
        q.__class__ = GatheredHybridQuantizer
        return q

    def _one_pass(self, tensor: torch.Tensor) -> bool:
        if not ONE_PASS:  # first: with it off, nothing here touches TE's attributes
            return False
        row, col = self.rowwise_quantizer, self.columnwise_quantizer
        return (
            self.rowwise_usage
            and self.columnwise_usage
            and tensor.is_cuda
            and getattr(self, "columnwise_source", "original") == "original"
            and all(
                isinstance(q, FakeQuantizer) and not q._passes_through and get_format(q.operand.fmt).triton
                for q in (row, col)
            )
        )

    def _both(self, x2: torch.Tensor, row_out=None, col_out=None):
        row, col = self.rowwise_quantizer, self.columnwise_quantizer
        col._check_tokens(x2)
        d_row, d_col = row.plan(), col.plan()  # seeds in the order of TE's two calls
        STATE.one_pass_calls += 1
        how = dict(rht_signs=STATE.rht_signs, sr_bits=STATE.recipe.sr_bits, out_dtype=x2.dtype)
        if one_quantization_serves_both(d_row, d_col):
            # Both GEMMs read the same values (NVFP4 16x16 weights): one buffer for both layouts, so TE's
            # cached weight workspace holds one BF16 copy, not two.
            y = fake_quantize_2d_pair(x2, d_row, None, row_out=row_out, **how)[0]
            if col_out is not None and not _same_storage(col_out, y):  # a workspace with two buffers
                return y, col_out.copy_(y)
            return y, y
        return fake_quantize_2d_pair(x2, d_row, d_col, row_out=row_out, col_out=col_out, **how)

    def quantize_impl(self, tensor):
        if not self._one_pass(tensor):
            return super().quantize_impl(tensor)
        data = tensor.detach()
        row, col = self.rowwise_quantizer, self.columnwise_quantizer
        row.ready, col.ready = self._both(data.reshape(-1, data.shape[-1]))
        try:
            return super().quantize_impl(tensor)
        finally:
            row.ready = col.ready = None

    @staticmethod
    def _workspace_buffers(dst) -> list:
        """The row- and column-wise BF16 buffers of TE's cached weight workspace `dst` (None where absent)."""
        return [
            getattr(getattr(dst, a, None), "_hp_data", None)
            for a in ("_rowwise_storage", "_columnwise_storage")
        ]

    def _unshare_workspace(self, dst, serves_both: bool) -> None:
        """A cached workspace made while one quantization served both layouts holds one buffer for both
        (_both). When a refresh no longer serves both (QAF passes dgrad_w through; a phase changes a
        format), the column-wise layout gets its own buffer: else its write lands on the row-wise values
        (under QAF the raw weight overwrote the quantized fprop weight)."""
        hps = self._workspace_buffers(dst)
        if serves_both or any(h is None for h in hps) or not _same_storage(*hps):
            return
        dst._columnwise_storage._hp_data = torch.empty_like(hps[1])

    def update_quantized(self, src, dst, *, noop_flag=None):
        """TE's cached weight workspace: both layouts written into their buffers by one pass."""
        one_pass = noop_flag is None and self._one_pass(src)
        if ONE_PASS:  # with it off no workspace shares a buffer, and nothing here touches TE's attributes
            row, col = self.rowwise_quantizer, self.columnwise_quantizer
            self._unshare_workspace(dst, one_pass and one_quantization_serves_both(row.peek(), col.peek()))
        if not one_pass:
            return super().update_quantized(src, dst, noop_flag=noop_flag)
        row, col = self.rowwise_quantizer, self.columnwise_quantizer
        hps = self._workspace_buffers(dst)
        if all(q._writes_into(src, h) for q, h in zip((row, col), hps)):
            x2 = src.detach().reshape(-1, src.shape[-1])
            self._both(x2, row_out=hps[0].view(x2.shape), col_out=hps[1].view(x2.shape))
            return dst
        return super().update_quantized(src, dst, noop_flag=noop_flag)


# One pair-kernel pass where TE asks for both layouts of a tensor at once (GatheredHybridQuantizer); the
# same values as two calls (tests/gpu/test_megatron_weight_cache.py). LLMTRAIN_ONE_PASS=0: two calls.
ONE_PASS = switch("LLMTRAIN_ONE_PASS", default=True)

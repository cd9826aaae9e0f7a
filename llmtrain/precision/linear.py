"""QuantLinear: y = x W^T with the operands of all three GEMMs quantized as a PrecisionRecipe says.

Emulation: operands are quantized to their formats (codes x block scales, exact in BF16), the GEMM runs
in the activation dtype (FP32 on CPU, BF16 under CUDA autocast) with FP32 accumulation, and per-tensor
scales are applied to the FP32 result before its one rounding to the activation dtype, as TE's native
GEMMs do. Master weights, their gradients and the optimizer state stay FP32.

In QAF mode (`qaf=True`) the forward stays quantized and dgrad/wgrad run in high precision on the
original x and W. The mode is read when backward runs, so the monitor can re-run only the backward.

Weights are quantized once per optimizer step, not once per micro-batch (weights do not change between
micro-batches; TE caches its weight casts the same way, see te_custom.py): the fprop W and the dgrad W^T
are two cached items per layer, each valid while the weight tensor (identity, storage, in-place version
counter), every torch optimizer's step count (a global step hook: fused AdamW does not bump `_version`),
the operand, the compute dtype and, for stochastically rounded weights, the training step are unchanged.
So an SR weight is drawn once per step, as TE draws it once per step from its cached workspace.
`.data` writes (`p.data.copy_(...)`) bypass the version counter: call `clear_weight_cache()` after them.
Cost: while cached, each quantized weight is held twice more (W and W^T values in the compute dtype).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from llmtrain.precision.hadamard import TE_SIGNS, hadamard, random_signs
from llmtrain.precision.quantize import Parts, quantize_parts
from llmtrain.precision.recipe import PrecisionRecipe

_OPTIMIZER_STEPS = [0]  # steps taken by any torch optimizer in this process


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class QuantLinear(nn.Module):
    """Drop-in for a bias-free nn.Linear; holds the same `weight` Parameter (names and shapes unchanged)."""

    def __init__(self, linear: nn.Linear, recipe: PrecisionRecipe, *, seed: int = 0):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear supports bias-free linears only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.recipe = recipe
        self.seed = seed
        self.qaf = False
        self.step = 0
        self._generator: torch.Generator | None = None
        self._signs: torch.Tensor | None = None
        self.cache_weights = True  # False: quantize W on every micro-batch (tests compare both)
        self._weight_cache: dict[bool, tuple[tuple, Parts]] = {}  # transposed? -> (key, parts)
        self.weight_cache_hits = self.weight_cache_misses = 0

    def begin_step(self, step: int) -> None:
        """Stochastic rounding in this step draws from (layer seed, step): a resumed run repeats it exactly."""
        self.step, self._generator = int(step), None
        self.clear_weight_cache()

    def clear_weight_cache(self) -> None:
        self._weight_cache.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        """Stochastic-rounding RNG of this layer, seeded from (run seed, layer position, step)."""
        if self._generator is None or self._generator.device != device:
            seed = (self.seed * 1_000_003 + self.step) % 2**63
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    def rht_signs(self, device: torch.device) -> torch.Tensor:
        if self._signs is None:
            if self.recipe.rht_signs == "te":
                self._signs = torch.tensor(TE_SIGNS)
            else:
                self._signs = random_signs(self.recipe.rht_size, torch.Generator().manual_seed(self.seed + 1))
        return self._signs.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFn.apply(x, self.weight, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.recipe.describe()}"


def _operand(t: torch.Tensor, name: str, layer: QuantLinear) -> Parts:
    """Operand `name` (e.g. "fprop_x") of the layer's recipe, quantized (with its NVFP4 options)."""
    r = layer.recipe
    op = getattr(r, name)
    if not op.quantized:
        return Parts(t, None)
    gen = layer.generator(t.device) if op.rounding == "stochastic" else None
    return quantize_parts(t, op.fmt, op.rounding, op.block_2d, gen, sr_bits=r.sr_bits,
                          four_over_six=r.four_over_six(name), row_scaled=r.row_scaled(name))  # fmt: skip


def _weight_operand(weight: torch.Tensor, name: str, layer: QuantLinear, transposed: bool, cd) -> Parts:
    """Quantized W (fprop) or W^T (dgrad), from the layer's cache while the weight is unchanged."""
    op = getattr(layer.recipe, name)
    if not op.quantized or not layer.cache_weights:
        return _operand(weight.t() if transposed else weight, name, layer)
    key = (id(weight), weight.data_ptr(), weight._version, _OPTIMIZER_STEPS[0], op, cd, weight.device,
           layer.step if op.rounding == "stochastic" else None, layer.recipe.four_over_six(name))  # fmt: skip
    hit = layer._weight_cache.get(transposed)
    if hit is not None and hit[0] == key:
        layer.weight_cache_hits += 1
        return hit[1]
    layer.weight_cache_misses += 1
    parts = _operand(weight.t() if transposed else weight, name, layer)
    parts = Parts(parts.values.to(cd), parts.factor)  # stored as the GEMM reads it: a hit costs no cast
    layer._weight_cache[transposed] = (key, parts)
    return parts


def _gemm(a: Parts, b: Parts, dtype: torch.dtype) -> torch.Tensor:
    """(a.values @ b.values^T) * a.factor * b.factor: [m, k] x [n, k] -> [m, n], rounded to `dtype` once.

    As TE's native FP8/NVFP4 GEMMs: the exact operands (codes x block scales) are accumulated in FP32, the
    per-tensor factors scale the FP32 result, and only then is it rounded to the output dtype.
    """
    factor = None
    for f in (a.factor, b.factor):
        if f is not None:
            factor = f if factor is None else factor * f
    if factor is None:
        return a.values.to(dtype) @ b.values.to(dtype).t()
    return (_fp32_gemm(a.values.to(dtype), b.values.to(dtype).t()) * factor).to(dtype)


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=float32) available for this build/device


def _fp32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in FP32 (a BF16 GEMM would round its output before the factor)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[0] = False
    return a.float() @ b.float()  # exact: the operands are exact in their dtype


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, layer: QuantLinear):
        cd = _compute_dtype(x)
        y = _gemm(
            _operand(x.reshape(-1, x.shape[-1]), "fprop_x", layer),
            _weight_operand(weight, "fprop_w", layer, False, cd),
            cd,
        )
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.cd = layer, cd
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer, cd, r = ctx.layer, ctx.cd, ctx.layer.recipe
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        hp = layer.qaf
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if hp:
                dx = dy2.to(cd) @ weight.to(cd)
            else:  # dx = dy @ W: both operands blocked along out_features (W^T's rows)
                dx = _gemm(
                    _operand(dy2, "dgrad_dy", layer), _weight_operand(weight, "dgrad_w", layer, True, cd), cd
                )
            dx = dx.view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            a, b = dy2.t(), x2.t()  # dW = dy^T x: both blocked along tokens
            if hp:
                dw = a.to(cd) @ b.to(cd).t()
            else:
                if r.rht:
                    size, signs = r.rht_size, layer.rht_signs(x.device)
                    pad = -a.shape[1] % size  # zero tokens leave the product unchanged
                    a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
                    a, b = hadamard(a.to(cd), size, signs), hadamard(b.to(cd), size, signs)
                dw = _gemm(_operand(a, "wgrad_dy", layer), _operand(b, "wgrad_x", layer), cd)
            dw = dw.to(weight.dtype)
        return dx, dw, None

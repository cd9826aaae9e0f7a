"""The precision layer: quantizers, the quantized linear, the sqrt(3) monitor and the precision schedule.

Engines call `convert_model` once after building the model and drive a `PrecisionController` from the
training loop. Module map: registry (the formats by name), recipes (the named precision recipes),
te_recipes (what Transformer Engine / Megatron run for a recipe, and its checks), formats (grids,
rounding), scaling (scale rules, as TE computes them), quantize (public quantizers), emulate (Triton or
torch fake quantization for TE's custom recipe), hadamard (RHT), recipe (per-GEMM operand description +
validation), nvfp4_options (TE 2.20's 4over6 / row-scaled keys), linear (QuantLinear), convert (model
surgery, recipe switch), monitor (sqrt(3) probe), phases (precision.schedule), controller (monitor
bookkeeping, phase triggers, phase LR). See docs/precision.md.

The names below are imported on first use (PEP 562), so `import llmtrain.precision.config` -- the config
schema's import -- does not import torch.
"""

import importlib
import sys
import types

_EXPORTS = {
    "FORMATS": "quantize",
    "PRECISION_NAMES": "recipes",
    "PrecisionConfig": "config",
    "PrecisionController": "controller",
    "PrecisionRecipe": "recipe",
    "QuantLinear": "linear",
    "QuantizedTensor": "quantize",
    "RunShape": "phases",
    "begin_step": "convert",
    "convert_model": "convert",
    "dequantize": "quantize",
    "fake_quantize": "quantize",
    "hadamard": "hadamard",
    "probe_quantization_noise": "monitor",
    "quantize": "quantize",
    "quantized_layers": "convert",
    "set_qaf": "convert",
    "set_recipe": "convert",
    "validate": "recipe",
    "validate_schedule": "phases",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # `from llmtrain.precision import recipe` then imports the submodule itself
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`quantize` and `hadamard` name both a submodule and the function exported here. Importing a
    submodule binds it on its package; the exported function keeps the name (as the eager imports did)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

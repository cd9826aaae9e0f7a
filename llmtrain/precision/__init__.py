"""The precision layer: quantizers, the quantized linear, the sqrt(3) monitor and the precision schedule.

Engines call `convert_model` once after building the model and drive a `PrecisionController` from the
training loop. Module map: formats (grids, rounding), scaling (TE's scale selection), quantize (public
quantizers), hadamard (RHT), recipe (per-GEMM operand description + validation), nvfp4_options (TE 2.20's
4over6 / row-scaled keys), linear (QuantLinear),
convert (model surgery, recipe switch), monitor (sqrt(3) probe), phases (precision.schedule), controller
(monitor bookkeeping, phase triggers, phase LR). See docs/precision.md.
"""

from llmtrain.precision.config import PRECISION_NAMES, PrecisionConfig
from llmtrain.precision.controller import PrecisionController
from llmtrain.precision.convert import begin_step, convert_model, quantized_layers, set_qaf, set_recipe
from llmtrain.precision.hadamard import hadamard
from llmtrain.precision.linear import QuantLinear
from llmtrain.precision.monitor import probe_quantization_noise
from llmtrain.precision.phases import RunShape, validate_schedule
from llmtrain.precision.quantize import FORMATS, QuantizedTensor, dequantize, fake_quantize, quantize
from llmtrain.precision.recipe import PrecisionRecipe, validate

__all__ = [
    "FORMATS",
    "PRECISION_NAMES",
    "PrecisionConfig",
    "PrecisionController",
    "PrecisionRecipe",
    "QuantLinear",
    "QuantizedTensor",
    "RunShape",
    "begin_step",
    "convert_model",
    "dequantize",
    "fake_quantize",
    "hadamard",
    "probe_quantization_noise",
    "quantize",
    "quantized_layers",
    "set_qaf",
    "set_recipe",
    "validate",
    "validate_schedule",
]

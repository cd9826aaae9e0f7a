"""Temporary precision modes of a converted torch model, for the sqrt(3) probe and the BF16 evaluation.

Each is a context manager that restores the layers exactly as it found them, so training after it is
bit-for-bit what it would have been without it:

  unquantized      every QuantLinear runs as a plain linear (forward and backward) in the caller's dtype:
                   FP32 on the CPU, BF16 under CUDA autocast, i.e. what a bf16 run computes.
  backward_mode    dgrad/wgrad quantized (False) or in high precision (True, QAF's backward).
  sr_stream        stochastic rounding draws from the stream of `key` instead of the current step's;
                   the probe uses negative keys, which no training step (>= 0) uses.
"""

from contextlib import contextmanager

from llmtrain.precision.convert import quantized_layers
from llmtrain.precision.recipe import PrecisionRecipe

_UNQUANTIZED = PrecisionRecipe()  # every operand left in high precision, no RHT


@contextmanager
def _on_every_layer(model, attr: str, value):
    layers = list(quantized_layers(model).values())
    saved = [getattr(m, attr) for m in layers]
    try:
        for m in layers:
            setattr(m, attr, value)
        yield
    finally:
        for m, before in zip(layers, saved):
            setattr(m, attr, before)


def unquantized(model):
    return _on_every_layer(model, "recipe", _UNQUANTIZED)


def backward_mode(model, high_precision: bool):
    return _on_every_layer(model, "qaf", bool(high_precision))


@contextmanager
def sr_stream(model, key: int):
    layers = list(quantized_layers(model).values())
    saved = [(m.step, m._generator) for m in layers]  # the generator object itself: its position too
    try:
        for m in layers:
            m.begin_step(key)
        yield
    finally:
        for m, (step, generator) in zip(layers, saved):
            m.step, m._generator = step, generator

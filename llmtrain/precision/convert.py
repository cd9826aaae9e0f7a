"""Swap a model's per-layer GEMMs (its family's `gemms`) for QuantLinear, in place; switch their recipe (phases)."""

import torch
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.llama.family import LlamaFamily
from llmtrain.precision.hadamard import random_signs
from llmtrain.precision.linear import QuantLinear
from llmtrain.precision.recipe import TORCH_BACKENDS, PrecisionRecipe, bf16_layer_counts, validate

# Models without a spec (tests' bare modules) get Llama's list; a model's family names its own.
GEMMS = LlamaFamily.gemms


def model_gemms(model: nn.Module) -> tuple[str, ...]:
    spec = getattr(model, "spec", None)
    return spec.model_family.gemms if spec is not None else GEMMS


def convert_model(model: nn.Module, cfg, *, seed: int = 0) -> None:
    """Quantize every attention/MLP GEMM of `model.layers` except the BF16 ones at either end (cfg.bf16_layers).

    Embeddings, the output head, norms and attention (softmax) stay in high precision. The replacement
    holds the original `weight` Parameter, so parameter names and shapes are unchanged. bf16: no-op.
    """
    num_layers = len(model.layers)
    validate(cfg, num_layers)
    if cfg.name == "bf16":
        return
    if cfg.backend not in TORCH_BACKENDS:
        raise ConfigError(
            "precision.backend",
            cfg.backend,
            "the torch engine emulates the formats in PyTorch; native/custom "
            "are Transformer Engine back ends (engine=megatron)",
            TORCH_BACKENDS,
        )
    recipe = PrecisionRecipe.from_config(cfg)
    # rht_signs=random: one sign vector per run, drawn from the run seed exactly as the Megatron engine's
    # te_custom.activate draws it, so both engines transform with the same vector.
    signs = random_signs(recipe.rht_size, torch.Generator().manual_seed(seed + 1))
    first, last = bf16_layer_counts(cfg, num_layers)
    gemms = model_gemms(model)
    for i in range(first, num_layers - last):
        for j, path in enumerate(gemms):
            parent_name, attr = path.split(".")
            parent = getattr(model.layers[i], parent_name)
            linear = getattr(parent, attr)
            # Distinct SR streams per GEMM, reproducible from the run seed.
            layer_seed = (seed * 1_000_003 + i * len(gemms) + j) % 2**63
            quant = QuantLinear(linear, recipe, seed=layer_seed)
            if recipe.rht_signs == "random":
                quant._signs = signs  # QuantLinear.rht_signs() returns this cached vector
            setattr(parent, attr, quant)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_recipe(model: nn.Module, recipe: PrecisionRecipe) -> None:
    """A precision phase starts: every quantized GEMM runs `recipe` from its next forward/backward on."""
    for m in quantized_layers(model).values():
        m.recipe = recipe


def set_qaf(model: nn.Module, active: bool) -> None:
    """QAF on: forward stays quantized, dgrad/wgrad in high precision. Off: all three GEMMs quantized."""
    for m in quantized_layers(model).values():
        m.qaf = bool(active)


def begin_step(model: nn.Module, step: int) -> None:
    """Reseed every quantized layer's stochastic rounding for optimizer step `step`."""
    for m in quantized_layers(model).values():
        m.begin_step(step)

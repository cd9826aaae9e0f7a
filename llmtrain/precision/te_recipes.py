"""What Transformer Engine and Megatron-Core run for a precision config, and the checks that go with it.

The Megatron engine asks this module, and knows no format: `precision_settings` gives the
TransformerConfig fields (TE's native recipe where the named recipe has one this GPU and these keys allow,
else Megatron's custom recipe with llmtrain's quantizer factory) and a description of what runs;
`resolve_backend` says which of the two; `lowp_param_gather_kwargs` gives Bridge's low-precision
parameter all-gather fields; `start_emulation` checks what only the emulated back end refuses and
activates te_custom's factory. Plain dicts, no TE or Megatron import (te_custom is imported only when
emulation starts), so the CPU suite checks all of it.
"""

from llmtrain.errors import ConfigError, UserError
from llmtrain.precision.recipes import get_recipe
from llmtrain.precision.registry import get_format

# Megatron-Core finds the quantizer factory of its custom recipe by this dotted path.
QFACTORY = "llmtrain.precision.te_custom.qfactory"
MEGATRON_BACKENDS = ["auto", "native", "custom"]  # twin of precision.recipe.TORCH_BACKENDS


def native_mismatch(prec, capability: tuple[int, int]) -> str | None:
    """Why TE's native recipe cannot run this precision config on this GPU (None: it can)."""
    native = get_recipe(prec.name).native
    if native is None:
        return f"precision={prec.name} has no TE native recipe"
    if tuple(capability) < native.min_capability:
        cc = native.min_capability
        return f"TE's native {native.recipe} needs compute capability >= {cc[0]}.{cc[1]}, this GPU is sm_{capability[0]}{capability[1]}"
    if why := native.check(prec):
        return why
    for key, want in native.fixed.items():
        if prec[key] != want:
            return f"TE's native {native.recipe} fixes precision.{key} to {want!r} (got {prec[key]!r})"
    from llmtrain.precision.recipe import operand_overrides

    if operand_overrides(prec):
        return f"TE's native {native.recipe} fixes every operand (precision.operands.* is set)"
    if prec.monitor.enabled:
        return "the sqrt(3) monitor needs llmtrain's quantizers"
    return native_schedule_mismatch(prec)


def native_phase_mode(base, recipe) -> str | None:
    """How native TE runs a phase's recipe next to the run's base recipe: "same", "high_precision" (the
    whole backward in high precision: TE's backward_override="high_precision"), "off" (no GEMM
    quantized: Megatron's fp8/fp4 context off), or None (TE's native recipes cannot express it)."""
    from llmtrain.precision.phases import is_qaf

    if recipe == base:
        return "same"
    if not recipe.quantized:
        return "off"
    if is_qaf(base, recipe):
        return "high_precision"
    return None


def native_schedule_mismatch(prec) -> str | None:
    """Why native TE cannot run precision.schedule (or the legacy QAF switch); None: it can."""
    from llmtrain.precision.phases import phase_recipes, phases_from_config

    phases = phases_from_config(prec)
    if any(p.trigger == "sqrt3" for p in phases):
        return "a sqrt(3)-triggered phase needs the monitor, i.e. llmtrain's quantizers"
    recipes = phase_recipes(prec, phases)
    for phase, recipe in zip(phases, recipes[1:]):
        if native_phase_mode(recipes[0], recipe) is None:
            return (
                f"{phase.key} ({phase.name}: {recipe.describe()}): TE's native recipes can only switch the "
                "whole backward to high precision (backward_override) or turn quantization off"
            )
    return None


def require_native_phases(prec, te_has_backward_override: bool) -> None:
    """Native back end: refuse, in one line, a schedule this TE cannot run (checked at engine build)."""
    from llmtrain.precision.phases import phase_recipes, phases_from_config

    recipes = phase_recipes(prec, phases_from_config(prec))
    if te_has_backward_override:
        return
    for recipe in recipes[1:]:
        if native_phase_mode(recipes[0], recipe) == "high_precision":
            raise UserError(
                "precision.schedule: a phase switches the backward to high precision, which native TE does "
                "with backward_override (Transformer Engine >= 2.20) and this TE lacks; upgrade TE or set "
                "precision.backend=custom"
            )


def resolve_backend(prec, capability: tuple[int, int]) -> tuple[str, str | None]:
    """-> ("native" | "custom", why native was not taken). auto: native where TE can, else custom."""
    if prec.backend not in MEGATRON_BACKENDS:
        raise ConfigError(
            "precision.backend",
            prec.backend,
            "the Megatron engine runs TE's native recipes or llmtrain's quantizers inside TE "
            "(torch is the torch engine's back end)",
            MEGATRON_BACKENDS,
        )
    if not get_recipe(prec.name).quantized:
        return "native", None
    why = native_mismatch(prec, capability)
    if prec.backend == "native" and why:
        raise UserError(
            f"precision={prec.name} precision.backend=native: {why}; use precision.backend=custom "
            "(llmtrain's quantizers inside TE, any GPU) or auto"
        )
    if prec.backend == "custom" or why:
        return "custom", why
    return "native", None


def _custom_kwargs(prec) -> tuple[dict, str]:
    from llmtrain.precision.recipe import PrecisionRecipe

    # Megatron's FP4 context when a role's format has 4-bit elements, its FP8 context otherwise; both call
    # our factory.
    formats = {prec.weight_format, prec.activation_format, prec.grad_format} - {"bf16"}
    if any(get_format(f).element_bits == 4 for f in formats):
        kwargs = {"fp4": "e2m1", "fp4_recipe": "custom", "fp4_quantizer_factory": QFACTORY}
    else:
        kwargs = {"fp8": "e4m3", "fp8_recipe": "custom", "fp8_quantizer_factory": QFACTORY}
    desc = f"emulated {prec.name} (llmtrain quantizers in TE CustomRecipe; {PrecisionRecipe.from_config(prec).describe()})"
    return kwargs, desc


def precision_settings(prec, capability: tuple[int, int], num_layers: int | None = None) -> tuple[dict, str]:
    """TransformerConfig fields for the precision recipe, and a description of what runs (and why).

    capability: the GPU's CUDA compute capability, e.g. (9, 0) for Hopper. num_layers: the model's depth
    (needed when bf16_layers is given as a fraction). A `te_recipe_fields` entry, when present, is not a
    TransformerConfig field: fields to set on the TE recipe objects Megatron builds (apply_te_recipe_fields).
    """
    from llmtrain.precision.recipe import bf16_layer_counts

    sm = f"sm_{capability[0]}{capability[1]}"
    named = get_recipe(prec.name)
    backend, why = resolve_backend(prec, capability)
    if not named.quantized:
        return {}, f"TE native BF16 on {sm}"
    kwargs, desc = named.native.megatron(prec) if backend == "native" else _custom_kwargs(prec)
    if why and prec.backend == "auto":
        desc += f" [not native: {why}]"
    b = prec.bf16_layers
    if num_layers is None and (b.get("first_fraction") or b.get("last_fraction")):
        raise ConfigError(
            "precision.bf16_layers", dict(b), "a fraction of depth needs the model's num_layers"
        )
    first, last = bf16_layer_counts(prec, num_layers or 0) if num_layers else (int(b.first), int(b.last))
    if first or last:
        kwargs.update(
            first_last_layers_bf16=True, num_layers_at_start_in_bf16=first, num_layers_at_end_in_bf16=last
        )
        desc += f", first {first} / last {last} layers in BF16"
    return kwargs, desc + f" on {sm}"


def lowp_param_gather_kwargs(prec) -> tuple[dict, dict, dict]:
    """Bridge's low-precision parameter all-gather: (TransformerConfig, DDPConfig, OptimizerConfig) fields."""
    native = get_recipe(prec.name).native
    gather = native.param_gather if native is not None else None
    if gather is None:
        raise ValueError(f"precision={prec.name} keeps BF16 parameters (no low-precision all-gather)")
    return tuple(dict(d) for d in gather)


def keeps_bf16_params(prec) -> bool:
    """Whether the named recipe keeps BF16 parameters (no low-precision parameter all-gather)."""
    native = get_recipe(prec.name).native
    return native is None or native.param_gather is None


def require_te_recipe_fields(fields: dict | None, te_has_fields: bool) -> None:
    """Native back end: the TE recipe fields (TE 2.20's NVFP4 options) need a TE that has them."""
    if fields and not te_has_fields:
        raise UserError(
            "precision.nvfp4_4over6 / row_scaled_activation need Transformer Engine >= 2.20; upgrade TE"
        )


def start_emulation(prec, recipe, seed: int, tokens: int, why_not_native: str | None) -> None:
    """Emulated back end: refuse in one line what it cannot run, then hand te_custom's quantizer factory
    the run's PrecisionRecipe (before Megatron builds the model).

    tokens: micro_batch_size * seq_length / cp, one wgrad operand's token count on a rank.
    why_not_native: resolve_backend's reason (None: precision.backend=custom chose it).
    """
    from llmtrain.precision.nvfp4_options import emulated_refusal

    if why := emulated_refusal(prec):
        raise UserError(f"{why} ({why_not_native or 'backend=custom'})")
    if recipe.rht and tokens % 16:  # else the wgrad quantizer would fail mid-step with a traceback
        raise UserError(
            f"precision.rht=true: the Hadamard transform needs micro_batch_size * seq_length / cp "
            f"divisible by 16, got {tokens}; change model.seq_length or set precision.rht=false"
        )
    from llmtrain.precision import te_custom

    te_custom.activate(recipe, int(seed))

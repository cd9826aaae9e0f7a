"""Translate llmtrain's config groups into Megatron-Core / TE settings (plain dicts, no Megatron import).

Kept free of Megatron and TE imports so the CPU suite can check the translation and its errors.
"""

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.layout import check_layout as resolve_layout  # noqa: F401 (one check, shared with preflight)
from llmtrain.errors import ConfigError, UserError
from llmtrain.models import ModelSpec

# Distributed-optimizer checkpoint format: reshardable across DP sizes, fully parallel save/load.
CKPT_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


# TE's native recipes and the knobs they fix (anything else needs our quantizers: precision.backend=custom).
_EXACT = {"quantize_fprop": True, "quantize_dgrad": True, "quantize_wgrad": True}
NATIVE_RECIPES = {
    "fp8_cs": ("Float8CurrentScaling", (8, 9), {
        **_EXACT, "weight_format": "fp8_e4m3", "activation_format": "fp8_e4m3", "rht": False,
        "fprop_rounding": "nearest", "dgrad_rounding": "nearest", "wgrad_rounding": "nearest"}),
    "mxfp8": ("MXFP8BlockScaling", (10, 0), {
        **_EXACT, "weight_format": "mxfp8", "activation_format": "mxfp8", "grad_format": "mxfp8",
        "rht": False, "weight_block_2d": False, "fprop_rounding": "nearest", "dgrad_rounding": "nearest",
        "wgrad_rounding": "nearest"}),
    # TE's NVFP4BlockScaling defaults: 16x16 weight tiles, RHT (TE's signs) on the wgrad inputs, SR on grads.
    "nvfp4": ("NVFP4BlockScaling", (10, 0), {
        **_EXACT, "weight_format": "nvfp4", "activation_format": "nvfp4", "grad_format": "nvfp4",
        "weight_block_2d": True, "rht": True, "rht_size": 16, "rht_signs": "te", "sr_operands": "grad",
        "fprop_rounding": "nearest", "dgrad_rounding": "stochastic", "wgrad_rounding": "stochastic"}),
}  # fmt: skip
NATIVE_RECIPES["nvfp4_fp4all"] = NATIVE_RECIPES["nvfp4"]
MEGATRON_BACKENDS = ["auto", "native", "custom"]  # twin of precision.recipe.TORCH_BACKENDS


def native_mismatch(prec, capability: tuple[int, int]) -> str | None:
    """Why TE's native recipe cannot run this precision config on this GPU (None: it can)."""
    recipe, min_cc, fixed = NATIVE_RECIPES[prec.name]
    if tuple(capability) < min_cc:
        return f"TE's native {recipe} needs compute capability >= {min_cc[0]}.{min_cc[1]}, this GPU is sm_{capability[0]}{capability[1]}"
    if prec.name == "fp8_cs" and prec.grad_format not in ("fp8_e5m2", "fp8_e4m3"):
        return f"TE's native {recipe} takes FP8 gradients only (precision.grad_format={prec.grad_format})"
    for key, want in fixed.items():
        if prec[key] != want:
            return f"TE's native {recipe} fixes precision.{key} to {want!r} (got {prec[key]!r})"
    from llmtrain.precision.recipe import operand_overrides

    if operand_overrides(prec):
        return f"TE's native {recipe} fixes every operand (precision.operands.* is set)"
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
    if prec.name == "bf16":
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


def _native_kwargs(prec) -> tuple[dict, str]:
    if prec.name == "fp8_cs":
        fmt = "hybrid" if prec.grad_format == "fp8_e5m2" else "e4m3"
        desc = f"TE native FP8 current scaling (Float8CurrentScaling, {fmt.upper()})"
        return {"fp8": fmt, "fp8_recipe": "tensorwise"}, desc
    if prec.name == "mxfp8":
        return {"fp8": "e4m3", "fp8_recipe": "mxfp8"}, "TE native MXFP8 (MXFP8BlockScaling)"
    from llmtrain.precision.nvfp4_options import NVFP4Options

    # 4over6 / row-scaled activations: NVFP4BlockScaling fields, set by the engine on Megatron's recipe.
    opts = NVFP4Options.from_config(prec)
    fields = {"te_recipe_fields": opts.te_fields()} if opts.active else {}
    desc = f"TE native NVFP4 (NVFP4BlockScaling{', ' + opts.describe() if opts.active else ''})"
    return {"fp4": "e2m1", "fp4_recipe": "nvfp4", **fields}, desc


def _custom_kwargs(prec) -> tuple[dict, str]:
    from llmtrain.precision.recipe import PrecisionRecipe

    # Megatron's FP4 context when any operand is FP4, its FP8 context otherwise; both call our factory.
    factory = "llmtrain.precision.te_custom.qfactory"
    formats = {prec.weight_format, prec.activation_format, prec.grad_format}
    if "nvfp4" in formats:
        kwargs = {"fp4": "e2m1", "fp4_recipe": "custom", "fp4_quantizer_factory": factory}
    else:
        kwargs = {"fp8": "e4m3", "fp8_recipe": "custom", "fp8_quantizer_factory": factory}
    desc = f"emulated {prec.name} (llmtrain Triton quantizers in TE CustomRecipe; {PrecisionRecipe.from_config(prec).describe()})"
    return kwargs, desc


def precision_settings(prec, capability: tuple[int, int], num_layers: int | None = None) -> tuple[dict, str]:
    """TransformerConfig fields for the precision recipe, and a description of what runs (and why).

    capability: the GPU's CUDA compute capability, e.g. (9, 0) for Hopper. num_layers: the model's depth
    (needed when bf16_layers is given as a fraction).
    """
    from llmtrain.precision.recipe import bf16_layer_counts

    sm = f"sm_{capability[0]}{capability[1]}"
    if prec.name not in ("bf16", *NATIVE_RECIPES):
        raise ConfigError("precision.name", prec.name, "unknown precision", ["bf16", *NATIVE_RECIPES])
    backend, why = resolve_backend(prec, capability)
    if prec.name == "bf16":
        return {}, f"TE native BF16 on {sm}"
    kwargs, desc = _native_kwargs(prec) if backend == "native" else _custom_kwargs(prec)
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


def transformer_config_kwargs(spec: ModelSpec, parallel, layout: Layout, precision_kwargs: dict) -> dict:
    """TransformerConfig fields: the model family's architecture, then numerics, parallelism, precision."""
    kwargs = spec.model_family.megatron.architecture_kwargs(spec)
    kwargs.update(
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        apply_rope_fusion=True,
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="native",
        # Loss = sum over tokens / tokens in the global batch, so loss masks weigh tokens equally.
        calculate_per_token_loss=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        gradient_accumulation_fusion=bool(parallel.grad_accum_fusion),
        deallocate_pipeline_outputs=layout.pp > 1,
    )
    if parallel.recompute == "selective":
        kwargs.update(recompute_granularity="selective")  # core attention only (Megatron's default set)
    elif parallel.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(precision_kwargs)
    return kwargs


def ddp_config_kwargs(parallel) -> dict:
    return dict(
        grad_reduce_in_fp32=True,  # FP32 main grads, as Megatron-Bridge's bf16_mixed
        overlap_grad_reduce=bool(parallel.overlap_grad_reduce),
        overlap_param_gather=bool(parallel.overlap_param_gather),
        use_distributed_optimizer=bool(parallel.distributed_optimizer),
    )


def optimizer_config_kwargs(optim, parallel) -> dict:
    if optim.name != "adamw":
        raise ConfigError("optim.name", optim.name, "the Megatron engine supports AdamW only", ["adamw"])
    return dict(
        optimizer="adam",  # decoupled weight decay by default, i.e. AdamW
        lr=float(optim.lr),
        min_lr=float(optim.min_lr),
        weight_decay=float(optim.weight_decay),
        adam_beta1=float(optim.beta1),
        adam_beta2=float(optim.beta2),
        adam_eps=float(optim.eps),
        clip_grad=float(optim.clip_grad),
        bf16=True,
        params_dtype=torch.bfloat16,
        # A constant scale of 1 changes no numbers but turns on Megatron's inf/NaN check, so a
        # non-finite gradient skips the update instead of corrupting the weights.
        loss_scale=1.0,
        use_distributed_optimizer=bool(parallel.distributed_optimizer),
        overlap_param_gather=bool(parallel.overlap_param_gather),
    )


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """What Megatron's OptimizerParamScheduler does each step, with the loop's LR."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_mult", 1.0)
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
        # Megatron keeps 1-D params (norms) out of weight decay through wd_mult=0.
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)

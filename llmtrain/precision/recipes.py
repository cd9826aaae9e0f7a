"""Named precision recipes, registered by the name `precision=<name>` selects (configs/precision/<name>.yaml).

As Megatron-Bridge's mixed_precision.py (bf16_mixed, bf16_with_fp8_current_scaling_mixed,
bf16_with_mxfp8_mixed, bf16_with_nvfp4_mixed, each a registered function that builds on bf16_mixed), each
recipe here is a registered function returning a NamedRecipe, composed from another one with
dataclasses.replace. The YAML holds the operand settings (formats, rounding, RHT, BF16 layers); the named
recipe holds what only the name decides: which TE native recipe runs it on the Megatron engine (TENative:
the recipe class, the GPU it needs, the keys it fixes, Megatron's fields for it, Bridge's low-precision
parameter all-gather). A recipe without one runs emulated there (llmtrain's quantizers inside TE's
CustomRecipe, te_recipes.py) and with llmtrain's quantizers on the torch engine. No torch import: the
config schema, preflight and the dry run read this.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from llmtrain.errors import ConfigError

_ALL_GEMMS = {"quantize_fprop": True, "quantize_dgrad": True, "quantize_wgrad": True}
_NEAREST = {"fprop_rounding": "nearest", "dgrad_rounding": "nearest", "wgrad_rounding": "nearest"}


def _no_check(prec) -> str | None:
    return None


@dataclass(frozen=True)
class TENative:
    """A TE recipe that runs a named recipe natively (Megatron's fp8/fp4 autocast, no llmtrain quantizer)."""

    recipe: str  # TE recipe class, e.g. "MXFP8BlockScaling"
    min_capability: tuple[int, int]  # CUDA compute capability it needs
    fixed: dict  # precision.* keys the TE recipe fixes: any other value needs llmtrain's quantizers
    # prec -> (TransformerConfig fields, a description of what runs)
    megatron: Callable[[object], tuple[dict, str]]
    # Bridge's low-precision parameter all-gather: (TransformerConfig, DDPConfig, OptimizerConfig) fields;
    # None: the recipe keeps BF16 parameters.
    param_gather: tuple[dict, dict, dict] | None = None
    check: Callable[[object], str | None] = _no_check  # a further reason TE cannot run `prec` natively


@dataclass(frozen=True)
class NamedRecipe:
    name: str  # precision.name, the YAML file's name
    bridge: str = ""  # Megatron-Bridge's name for the same recipe, if it has one
    quantized: bool = True  # bf16_mixed quantizes nothing
    native: TENative | None = None  # None: emulated on the Megatron engine (llmtrain's quantizers in TE)


RECIPES: dict[str, NamedRecipe] = {}


def register(builder: Callable[[], NamedRecipe]) -> Callable[[], NamedRecipe]:
    """Register the recipe `builder()` returns under its name (a decorator, as Bridge's recipes)."""
    recipe = builder()
    if recipe.name in RECIPES:
        raise ValueError(f"precision recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return builder


def get_recipe(name: str) -> NamedRecipe:
    if name not in RECIPES:
        raise ConfigError("precision.name", name, "unknown precision", list(RECIPES))
    return RECIPES[name]


def lowp_param_gather_recipes() -> tuple[str, ...]:
    """Recipes whose Bridge counterpart keeps the quantized parameters in low precision for the all-gather."""
    return tuple(n for n, r in RECIPES.items() if r.native is not None and r.native.param_gather is not None)


# ---- the recipes -------------------------------------------------------------------------------------------


@register
def bf16_mixed() -> NamedRecipe:
    return NamedRecipe("bf16", bridge="bf16_mixed", quantized=False)


def _fp8_cs_kwargs(prec) -> tuple[dict, str]:
    fmt = "hybrid" if prec.grad_format == "fp8_e5m2" else "e4m3"
    return {
        "fp8": fmt,
        "fp8_recipe": "tensorwise",
    }, f"TE native FP8 current scaling (Float8CurrentScaling, {fmt.upper()})"


def _fp8_cs_check(prec) -> str | None:
    if prec.grad_format not in ("fp8_e5m2", "fp8_e4m3"):
        return f"TE's native Float8CurrentScaling takes FP8 gradients only (precision.grad_format={prec.grad_format})"
    return None


@register
def bf16_with_fp8_current_scaling_mixed() -> NamedRecipe:
    native = TENative(
        "Float8CurrentScaling",
        (8, 9),
        {
            **_ALL_GEMMS,
            "weight_format": "fp8_e4m3",
            "activation_format": "fp8_e4m3",
            "rht": False,
            **_NEAREST,
        },
        _fp8_cs_kwargs,
        ({"fp8_param": True}, {"fp8_param_gather": True}, {"fp8_recipe": "tensorwise"}),
        _fp8_cs_check,
    )
    return replace(
        bf16_mixed(),
        name="fp8_cs",
        bridge="bf16_with_fp8_current_scaling_mixed",
        quantized=True,
        native=native,
    )


@register
def bf16_with_mxfp8_mixed() -> NamedRecipe:
    reuse = {"reuse_grad_buf_for_mxfp8_param_ag": True}
    native = TENative(
        "MXFP8BlockScaling",
        (10, 0),
        {
            **_ALL_GEMMS,
            "weight_format": "mxfp8",
            "activation_format": "mxfp8",
            "grad_format": "mxfp8",
            "rht": False,
            "weight_block_2d": False,
            **_NEAREST,
        },
        lambda prec: ({"fp8": "e4m3", "fp8_recipe": "mxfp8"}, "TE native MXFP8 (MXFP8BlockScaling)"),
        ({"fp8_param": True}, {"fp8_param_gather": True, **reuse}, {"fp8_recipe": "mxfp8", **reuse}),
    )
    return replace(bf16_mixed(), name="mxfp8", bridge="bf16_with_mxfp8_mixed", quantized=True, native=native)


def _nvfp4_kwargs(prec) -> tuple[dict, str]:
    from llmtrain.precision.nvfp4_options import NVFP4Options

    # 4over6 / row-scaled activations: NVFP4BlockScaling fields, set by the engine on Megatron's recipe.
    opts = NVFP4Options.from_config(prec)
    fields = {"te_recipe_fields": opts.te_fields()} if opts.active else {}
    desc = f"TE native NVFP4 (NVFP4BlockScaling{', ' + opts.describe() if opts.active else ''})"
    return {"fp4": "e2m1", "fp4_recipe": "nvfp4", **fields}, desc


@register
def bf16_with_nvfp4_mixed() -> NamedRecipe:
    # TE's NVFP4BlockScaling defaults: 16x16 weight tiles, RHT (TE's signs) on the wgrad inputs, SR on grads.
    native = TENative(
        "NVFP4BlockScaling",
        (10, 0),
        {
            **_ALL_GEMMS,
            "weight_format": "nvfp4",
            "activation_format": "nvfp4",
            "grad_format": "nvfp4",
            "weight_block_2d": True,
            "rht": True,
            "rht_size": 16,
            "rht_signs": "te",
            "sr_operands": "grad",
            "fprop_rounding": "nearest",
            "dgrad_rounding": "stochastic",
            "wgrad_rounding": "stochastic",
        },
        _nvfp4_kwargs,
        ({"fp4_param": True}, {"fp4_param_gather": True}, {}),
    )
    return replace(bf16_mixed(), name="nvfp4", bridge="bf16_with_nvfp4_mixed", quantized=True, native=native)


@register
def nvfp4_fp4all() -> NamedRecipe:
    """ "FP4 All the Way": Bridge's NVFP4 recipe with other operand settings (YAML), which TE's fixed keys
    then send to the emulated path."""
    return replace(bf16_with_nvfp4_mixed(), name="nvfp4_fp4all", bridge="")


@register
def bf16_with_mxfp4_mixed() -> NamedRecipe:
    """OCP MXFP4: no TE recipe (TE has none for MXFP4), so llmtrain's quantizers everywhere."""
    return replace(bf16_mixed(), name="mxfp4", bridge="", quantized=True)


PRECISION_NAMES = list(RECIPES)

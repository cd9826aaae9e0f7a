"""TE 2.20's NVFP4BlockScaling options as recipe keys (precision.nvfp4_4over6*, row_scaled_activation):
which operands get them, the preflight errors that mirror TE's restrictions, and the native TE mapping."""

import dataclasses
import importlib.util
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.precision import PrecisionRecipe, QuantLinear, te_recipes, validate
from llmtrain.precision import linear as linear_mod
from llmtrain.precision.nvfp4_options import emulated_refusal
from llmtrain.precision.quantize import FourOverSix
from tests.megatron_helpers import make_config

OPERANDS = ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")


def _prec(name="nvfp4", **keys):
    return make_config(precision=name, overrides={"precision": keys}).precision


@pytest.mark.parametrize(
    "scope,use_256,expected",
    [
        ("weights", "all", {"fprop_w": 256, "dgrad_w": 256}),
        ("activations", "all", {"fprop_x": 256, "wgrad_x": 256}),
        ("all", "weights", {"fprop_w": 256, "dgrad_w": 256, "fprop_x": 448, "wgrad_x": 448}),
        ("all", "none", {"fprop_w": 448, "dgrad_w": 448, "fprop_x": 448, "wgrad_x": 448}),
    ],
)
def test_4over6_scopes_reach_the_operands_of_te_quantizers(scope, use_256, expected):
    """TE: "weights" = the weight quantizer (W in fprop, W^T in dgrad), "activations" = the forward input
    quantizer (x in fprop, x^T in wgrad); gradients never; e4m3_use_256 picks 256 among those."""
    prec = _prec(
        nvfp4_4over6=scope, nvfp4_4over6_e4m3_use_256=use_256, nvfp4_4over6_err_mode="MSE", rht=False
    )
    validate(prec)
    r = PrecisionRecipe.from_config(prec)
    got = {n: r.four_over_six(n) for n in OPERANDS}
    assert got == {n: FourOverSix("MSE", expected[n]) if n in expected else None for n in OPERANDS}
    assert not any(r.row_scaled(n) for n in OPERANDS)


def test_row_scaled_reaches_the_fprop_activation_only():
    r = PrecisionRecipe.from_config(_prec(row_scaled_activation=True))
    assert [n for n in OPERANDS if r.row_scaled(n)] == ["fprop_x"]
    assert "row-scaled x" in r.describe()


def test_quantlinear_quantizes_each_operand_with_its_options(monkeypatch):
    """The options get to the GEMMs: every quantize_parts call QuantLinear makes in forward and backward,
    identified by its operand's shape (all six differ), carries the 4over6 / row-scaled setting TE gives
    that operand."""
    calls = {}
    real = linear_mod.quantize_parts

    def spy(t, fmt, rounding, block_2d, gen, **kw):
        calls[tuple(t.shape)] = (kw["four_over_six"], kw["row_scaled"])
        return real(t, fmt, rounding, block_2d, gen, **kw)

    monkeypatch.setattr(linear_mod, "quantize_parts", spy)
    prec = _prec(
        nvfp4_4over6="all", nvfp4_4over6_e4m3_use_256="weights", row_scaled_activation=True, rht=False
    )
    validate(prec)
    tokens, k, n = 64, 32, 48
    layer = QuantLinear(nn.Linear(k, n, bias=False), PrecisionRecipe.from_config(prec))
    x = torch.randn(tokens, k, requires_grad=True)
    layer(x).backward(torch.randn(tokens, n))
    w256, x448 = FourOverSix("MAE", 256), FourOverSix("MAE", 448)
    assert calls == {
        (tokens, k): (x448, True),  # fprop x
        (n, k): (w256, False),  # fprop W
        (tokens, n): (None, False),  # dgrad dy
        (k, n): (w256, False),  # dgrad W^T
        (n, tokens): (None, False),  # wgrad dy^T
        (k, tokens): (x448, False),  # wgrad x^T: 4over6 yes, row-scaled no (TE: row-wise usage only)
    }


def test_options_change_the_fprop_output():
    """Each option changes what the forward GEMM computes (against plain NVFP4 on the same data)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(128, 64) * torch.logspace(-3, 3, 128).view(-1, 1)  # rows of very different ranges
    plain = QuantLinear(lin, PrecisionRecipe.from_config(_prec(rht=False)))(x)
    for keys in (
        {"nvfp4_4over6": "weights"},
        {"nvfp4_4over6": "activations"},
        {"row_scaled_activation": True},
    ):
        y = QuantLinear(lin, PrecisionRecipe.from_config(_prec(rht=False, **keys)))(x)
        assert not torch.equal(y, plain), keys


@pytest.mark.parametrize(
    "name,keys,match",
    [
        ("nvfp4", {"nvfp4_4over6": "weight"}, r"precision.nvfp4_4over6='weight': not a valid choice"),
        ("nvfp4", {"nvfp4_4over6_e4m3_use_256": "yes"}, r"precision.nvfp4_4over6_e4m3_use_256='yes'"),
        ("nvfp4", {"nvfp4_4over6": "all", "nvfp4_4over6_err_mode": "L1"}, r"precision.nvfp4_4over6_err_mode"),
        ("mxfp8", {"nvfp4_4over6": "weights"}, r"4over6 is an NVFP4 block scaling, operand fprop_w is mxfp8"),
        ("fp8_cs", {"row_scaled_activation": True}, r"row-scaled is an NVFP4 option, fprop_x is fp8_e4m3"),
        ("bf16", {"nvfp4_4over6": "all"}, r"selects no quantized operand"),
        ("nvfp4", {"nvfp4_4over6": "activations"}, r"4over6 with the RHT is not implemented.*precision.rht=false"),
        ("nvfp4", {"nvfp4_4over6": "weights", "sr_operands": "all"},
         r"does not support stochastic rounding, operand dgrad_w.*precision.sr_operands=grad"),
        ("nvfp4", {"nvfp4_4over6": "weights", "fprop_rounding": "stochastic"},
         r"operand fprop_w rounds stochastically; set precision.fprop_rounding=nearest"),
        ("nvfp4", {"row_scaled_activation": True, "operands": {"fprop_x": {"block_2d": True}}},
         r"row_scaled_activation=True: TE's row-scaled NVFP4 takes 1x16 blocks"),
        ("nvfp4", {"row_scaled_activation": True, "fprop_rounding": "stochastic"},
         r"row_scaled_activation=True: .*fprop_x rounds stochastically"),
        ("nvfp4", {"row_scaled_activation": True, "quantize_fprop": False}, r"fprop_x\) is bf16"),
    ],
)  # fmt: skip
def test_preflight_refuses_in_one_line(name, keys, match):
    with pytest.raises(ConfigError, match=match) as err:
        validate(_prec(name, **keys))
    assert "\n" not in str(err.value)


def _with_phase(name, change):
    phase = {"name": name, "trigger": "step", "at": 10, "set": change}
    return OmegaConf.merge(_prec(nvfp4_4over6="weights"), {"schedule": [phase]})


def test_a_phase_that_breaks_an_option_is_refused_with_its_key():
    prec = _with_phase("sr", {"fprop": {"rounding": "stochastic"}})
    with pytest.raises(
        ConfigError,
        match=r"operand fprop_w rounds stochastically in precision.schedule.0 \(sr\); round it to nearest there",
    ):
        validate(prec)
    with pytest.raises(ConfigError, match=r"operand fprop_w is mxfp8 in precision.schedule.0 \(mx\)"):
        validate(_with_phase("mx", {"fprop_w": "mxfp8"}))
    validate(_with_phase("hp", {"fprop_w": "bf16"}))  # BF16 just leaves the option nothing to do there


def _te_recipe_module(te_reference):
    path = te_reference.src / "transformer_engine" / "common" / "recipe" / "__init__.py"
    spec = importlib.util.spec_from_file_location("_te_common_recipe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_megatron_native_maps_the_keys_to_te_nvfp4blockscaling_fields(te_reference):
    """Blackwell: the keys become NVFP4BlockScaling fields, which TE 2.20's recipe class accepts (its own
    checks run in __post_init__); without an option the recipe stays untouched (older TEs keep working)."""
    blackwell, hopper = (10, 0), (9, 0)
    prec = _prec(nvfp4_4over6="weights", nvfp4_4over6_err_mode="MSE", row_scaled_activation=True)
    kw, desc = te_recipes.precision_settings(prec, blackwell, 16)
    fields = kw["te_recipe_fields"]
    assert fields == {"nvfp4_4over6": "weights", "nvfp4_4over6_e4m3_use_256": "all",
                      "nvfp4_4over6_err_mode": "MSE", "row_scaled_activation": True}  # fmt: skip
    assert "4over6=weights" in desc and "row-scaled x" in desc and kw["fp4_recipe"] == "nvfp4"
    te = _te_recipe_module(te_reference)
    recipe = dataclasses.replace(te.NVFP4BlockScaling(), **fields)
    assert recipe.nvfp4_4over6 == "weights" and recipe.row_scaled_activation and not recipe.disable_rht
    assert "te_recipe_fields" not in te_recipes.precision_settings(_prec(), blackwell, 16)[0]
    # Hopper: the emulated path, which refuses them (the engine raises this line at build).
    kw, _ = te_recipes.precision_settings(prec, hopper, 16)
    assert kw["fp4_recipe"] == "custom"
    assert emulated_refusal(prec) == (
        "precision.nvfp4_4over6=weights and precision.row_scaled_activation=true is emulated only on "
        "engine=torch; on the Megatron engine it needs a Blackwell GPU (native TE)"
    )
    assert emulated_refusal(_prec()) is None

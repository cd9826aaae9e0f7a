"""The format registry, the named precision recipes, and the TE mapping the Megatron engine gets from them."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmtrain.config.estimate import BRIDGE_LOWP_PARAM_GATHER, LOWP_ELEMENT_BYTES
from llmtrain.engines.megatron_engine import param_gather
from llmtrain.errors import ConfigError, UserError
from llmtrain.precision import recipes, registry, te_recipes
from tests.helpers import cli_env
from tests.megatron_helpers import make_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "precision"
ENGINE = Path(__file__).resolve().parents[2] / "llmtrain" / "engines" / "megatron_engine"
HOPPER, BLACKWELL = (9, 0), (10, 0)


def test_every_precision_config_resolves_to_a_registered_recipe_and_back():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert names == set(recipes.RECIPES)
    for name in names:
        assert OmegaConf.load(CONFIGS / f"{name}.yaml").name == name
    with pytest.raises(ConfigError, match=r"precision.name='fp7': unknown precision \(allowed: bf16, fp8_cs"):
        recipes.get_recipe("fp7")


def test_recipes_compose_like_bridges():
    """nvfp4_fp4all is Bridge's NVFP4 recipe renamed: same TE recipe, same parameter all-gather."""
    assert recipes.RECIPES["nvfp4_fp4all"].native == recipes.RECIPES["nvfp4"].native
    assert recipes.RECIPES["mxfp8"].bridge == "bf16_with_mxfp8_mixed"
    assert recipes.RECIPES["mxfp4"].native is None and recipes.RECIPES["mxfp4"].quantized
    assert not recipes.RECIPES["bf16"].quantized
    assert BRIDGE_LOWP_PARAM_GATHER == ("fp8_cs", "mxfp8", "nvfp4", "nvfp4_fp4all")


def test_the_triton_kernels_implement_exactly_the_formats_the_registry_says():
    pytest.importorskip("triton")
    from llmtrain.precision import triton_kernels

    assert set(triton_kernels.FORMAT_IDS) == {n for n, f in registry.FORMATS.items() if f.triton}
    assert "mxfp4" not in triton_kernels.FORMAT_IDS  # MXFP4: the torch reference (emulate.py)
    assert triton_kernels.BLOCKS == {"mxfp8": 32, "nvfp4": 16}


def test_dry_run_plans_emulation_for_a_recipe_without_a_te_recipe():
    from llmtrain.config.estimate import emulated_planned

    assert emulated_planned(make_config(precision="mxfp4"))  # on any GPU: TE has no MXFP4 recipe
    assert not emulated_planned(make_config(precision="nvfp4"))  # auto: assumes a GPU where TE runs it
    assert emulated_planned(make_config(precision="nvfp4", overrides={"precision": {"backend": "custom"}}))
    assert not emulated_planned(make_config(precision="bf16", overrides={"precision": {"backend": "custom"}}))


def test_memory_estimate_reads_element_bytes_from_the_registry():
    assert LOWP_ELEMENT_BYTES == {"fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "mxfp8": 1.03, "nvfp4": 0.5625,
                                  "mxfp4": 0.53125}  # fmt: skip


def test_mxfp4_runs_emulated_in_megatrons_fp4_context():
    """No TE recipe: the custom recipe with our factory, in Megatron's FP4 context because E2M1 elements are
    4-bit (settings.py used to pick the FP4 context only for a format named nvfp4)."""
    prec = make_config(precision="mxfp4").precision
    for capability in (HOPPER, BLACKWELL):
        kw, desc = te_recipes.precision_settings(prec, capability, 4)
        assert kw == {"fp4": "e2m1", "fp4_recipe": "custom", "fp4_quantizer_factory": te_recipes.QFACTORY}
        assert (
            desc.startswith("emulated mxfp4")
            and "[not native: precision=mxfp4 has no TE native recipe]" in desc
        )
        assert te_recipes.resolve_backend(prec, capability) == (
            "custom",
            "precision=mxfp4 has no TE native recipe",
        )
    # A role in MXFP4 next to FP8 ones is enough for the FP4 context.
    mixed = make_config(precision="fp8_cs", overrides={"precision": {"grad_format": "mxfp4"}}).precision
    assert te_recipes.precision_settings(mixed, HOPPER, 4)[0]["fp4_recipe"] == "custom"
    prec.backend = "native"
    with pytest.raises(
        UserError, match=r"precision=mxfp4 precision.backend=native: precision=mxfp4 has no TE"
    ):
        te_recipes.precision_settings(prec, BLACKWELL, 4)


def test_mxfp4_keeps_bf16_parameters():
    cfg = make_config("llama3_8b", precision="mxfp4", parallel="megatron_8b")
    assert (
        param_gather.why_not(cfg.parallel, cfg.precision, BLACKWELL)
        == "precision=mxfp4 keeps BF16 parameters"
    )
    assert param_gather.resolve(cfg.parallel, cfg.precision, BLACKWELL, shards=8) is False


def test_the_megatron_engine_code_names_no_format():
    """Format knowledge lives in the precision package; the engine asks te_recipes (comments aside)."""
    formats = [*registry.FORMATS, "e2m1", "e4m3", "NVFP4BlockScaling", "MXFP8BlockScaling", "Float8Current"]
    for path in ENGINE.glob("*.py"):
        code = [line.split("#")[0] for line in path.read_text().splitlines()]
        code = "\n".join(line for line in code if not line.strip().startswith(('"""', "'")))
        for name in formats:
            assert f'"{name}"' not in code and f"'{name}'" not in code, (path.name, name)


def test_loading_the_config_schema_does_not_import_torch():
    code = "import sys, llmtrain.config.schema; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True
    )
    assert out.stdout.strip() == "False"


def test_start_emulation_refuses_in_one_line_then_activates_the_factory(monkeypatch):
    """The checks engine.py used to make itself (the RHT's token count, TE 2.20's options), then te_custom's
    activate with the run's recipe (te_custom itself needs TE: a stand-in records the call)."""
    import types

    from llmtrain.precision.recipe import PrecisionRecipe

    calls = []
    stub = types.SimpleNamespace(activate=lambda recipe, seed: calls.append((recipe, seed)))
    monkeypatch.setitem(sys.modules, "llmtrain.precision.te_custom", stub)
    nvfp4 = make_config(precision="nvfp4").precision
    recipe = PrecisionRecipe.from_config(nvfp4)
    with pytest.raises(
        UserError, match=r"^precision.rht=true: the Hadamard transform needs .* got 24; change"
    ):
        te_recipes.start_emulation(nvfp4, recipe, 0, 24, None)
    opts = make_config(precision="nvfp4", overrides={"precision": {"nvfp4_4over6": "weights"}}).precision
    with pytest.raises(
        UserError, match=r"nvfp4_4over6=weights is emulated only on engine=torch.*\(backend=custom\)$"
    ):
        te_recipes.start_emulation(opts, PrecisionRecipe.from_config(opts), 0, 32, None)
    assert calls == []
    mxfp4 = make_config(precision="mxfp4").precision
    te_recipes.start_emulation(mxfp4, PrecisionRecipe.from_config(mxfp4), 7, 24, "no TE recipe")
    assert calls == [(PrecisionRecipe.from_config(mxfp4), 7)]

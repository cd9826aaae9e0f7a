"""Model families through the registry: formulas against the models, the Qwen3 shapes, the engines' view."""

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from llmtrain.cli import preflight
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from llmtrain.engines.megatron_engine import settings
from llmtrain.errors import ConfigError, UserError
from llmtrain.models import FAMILIES, ModelSpec, get_family
from llmtrain.models.llama.model import LlamaModel
from llmtrain.models.qwen3.model import Qwen3Model
from tests.helpers import REPO
from tests.megatron_helpers import make_config

register_configs()
register_resolvers()


def spec(name: str) -> ModelSpec:
    return ModelSpec.from_config(yaml.safe_load((REPO / "configs/model" / f"{name}.yaml").read_text()))


def test_registry_names_every_family_and_refuses_others():
    assert sorted(FAMILIES) == ["llama", "qwen3"]
    assert isinstance(spec("tiny").model_family.build_model(spec("tiny")), LlamaModel)
    assert type(spec("qwen3_tiny").model_family.build_model(spec("qwen3_tiny"))) is Qwen3Model
    with pytest.raises(
        ConfigError, match=r"model.family='gpt2': unknown model family \(allowed: llama, qwen3\)"
    ):
        get_family("gpt2")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.family=gpt2"], "model.family='gpt2': not a valid choice (allowed: llama, qwen3)"),
        (
            ["model.head_dim=64"],
            "model.head_dim=64: Llama's head dimension is hidden_size/num_attention_heads",
        ),
        (["recipe=qwen3_tiny", "model.head_dim=63"], "model.head_dim=63: must be a positive even number"),
    ],
)
def test_family_config_errors_are_one_line(overrides, expected):
    with pytest.raises(UserError) as info:
        preflight(overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_0_6b"])
def test_qwen3_parameter_count_matches_the_torch_model(name):
    s = spec(name)
    with torch.device("meta"):
        model = s.model_family.build_model(s)
    assert sum(p.numel() for p in model.parameters()) == s.num_params()  # parameters(): tied weight once


def test_qwen3_0_6b_matches_the_published_counts():
    """Qwen/Qwen3-0.6B's model card: 0.6B parameters, 0.44B without the (tied) embedding."""
    s = spec("qwen3_0_6b")
    assert s.tie_embeddings and s.head_dim == 128 != s.hidden_size // s.num_attention_heads
    assert s.num_params() == pytest.approx(0.6e9, rel=0.01)
    assert s.num_params() - s.vocab_size * s.hidden_size == pytest.approx(0.44e9, rel=0.01)


def test_qwen3_flops_use_the_attention_width():
    s = spec("qwen3_0_6b")
    h, a, kv, f = s.hidden_size, s.num_attention_heads * s.head_dim, s.kv_dim, s.ffn_hidden_size
    linear = 2 * h * a + 2 * h * kv + 3 * h * f  # q and o are hidden x heads*head_dim here (2048, not 1024)
    assert s.layer_linear_params() == linear
    n_matmul = s.num_layers * linear + s.vocab_size * h
    assert s.flops_per_token() == 6 * n_matmul + 12 * s.num_layers * a * s.seq_length


def test_llama_formulas_unchanged_by_the_move():
    """The Llama formulas as they were in models/spec.py (q and o: hidden x hidden)."""
    s = spec("llama3_8b")
    h, f, kv = s.hidden_size, s.ffn_hidden_size, s.kv_dim
    assert s.layer_linear_params() == 2 * h * h + 2 * h * kv + 3 * h * f
    assert s.num_params() == s.num_layers * (s.layer_linear_params() + 2 * h) + 2 * s.vocab_size * h + h
    assert s.flops_per_token() == 6.0 * (s.num_layers * s.layer_linear_params() + s.vocab_size * h) + (
        12.0 * s.num_layers * h * s.seq_length
    )


def test_qwen3_megatron_transformer_config():
    cfg = make_config("qwen3_0_6b")
    s = ModelSpec.from_config(cfg.model)
    kw = settings.transformer_config_kwargs(s, cfg.parallel, settings.resolve_layout(cfg.parallel, s, 1), {})
    assert kw["qk_layernorm"] is True and kw["kv_channels"] == 128 and kw["num_query_groups"] == 8
    assert kw["layernorm_epsilon"] == 1e-6 and kw["normalization"] == "RMSNorm"
    assert s.model_family.megatron.layer_spec_kwargs() == {"qk_layernorm": True}
    llama = ModelSpec.from_config(make_config("tiny").model)
    assert "qk_layernorm" not in settings.transformer_config_kwargs(
        llama, cfg.parallel, settings.resolve_layout(cfg.parallel, llama, 1), {}
    )
    assert llama.model_family.megatron.layer_spec_kwargs() == {}


def test_qwen3_quantizes_the_same_gemms_and_keeps_its_norms():
    from llmtrain.precision import convert_model
    from llmtrain.precision.linear import QuantLinear

    s = spec("qwen3_tiny")
    model = s.model_family.build_model(s)
    prec = make_config("qwen3_tiny", precision="nvfp4").precision
    convert_model(model, OmegaConf.merge(prec, {"bf16_layers": {"first": 0, "last": 0}}), seed=1)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == s.num_layers * len(s.model_family.gemms) == s.num_layers * 7
    assert not any("norm" in n for n in quant)

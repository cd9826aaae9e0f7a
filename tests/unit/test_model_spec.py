import pytest
import torch
import yaml

from llmtrain.models import ModelSpec
from llmtrain.models.llama import LlamaModel
from tests.helpers import REPO


def spec(name: str) -> ModelSpec:
    return ModelSpec.from_config(yaml.safe_load((REPO / "configs/model" / f"{name}.yaml").read_text()))


def test_llama3_8b_parameter_count_matches_published_8_03b():
    assert spec("llama3_8b").num_params() == pytest.approx(8.03e9, rel=0.005)


def test_parameter_count_matches_the_torch_model():
    s = spec("tiny")
    model = LlamaModel(s)
    assert sum(p.numel() for p in model.parameters()) == s.num_params()


def test_tied_embeddings_are_counted_once():
    s = spec("llama3_1b")
    assert s.tie_embeddings
    untied = ModelSpec(**{**s.__dict__, "tie_embeddings": False})
    assert untied.num_params() - s.num_params() == s.vocab_size * s.hidden_size


def test_flops_per_token_follows_6n_plus_attention():
    s = spec("llama3_8b")
    n_matmul = s.num_layers * s.layer_linear_params() + s.vocab_size * s.hidden_size
    attention = 12 * s.num_layers * s.hidden_size * s.seq_length
    assert s.flops_per_token() == 6 * n_matmul + attention
    # Published rule of thumb: ~6N plus a few percent for attention at 8k context.
    assert 6 * s.num_params() < s.flops_per_token() < 8 * s.num_params()


def test_model_is_causal():
    s = ModelSpec(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=50,
        seq_length=16,
    )
    model = LlamaModel(s)
    model.init_weights(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])

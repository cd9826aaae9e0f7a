"""The Qwen3 family's Megatron-Core mapping on the CPU: transformers' Qwen3ForCausalLM weights, mapped by
`models/qwen3/megatron.py` into a Megatron-Core GPTModel built from the family's own TransformerConfig
fields (qk_layernorm, kv_channels = head_dim != hidden/heads), give the same logits; and back.

Megatron-Core's local (non-TE) layer spec runs on the CPU with qk_layernorm; the engine's TE spec runs on the
GPU (tests/gpu/test_qwen3_megatron_parity.py). Tolerance: FP32, atol=1e-5.
"""

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from llmtrain.convert import api, megatron  # noqa: E402
from llmtrain.engines.megatron_engine import mapping  # noqa: E402
from tests.integration.test_convert_megatron_cpu import (  # noqa: E402
    ATOL,
    build_gpt,
    mcore_cpu,  # noqa: F401 (a fixture, used below)
    mcore_logits,
    to_local_spec,
)
from tests.integration.test_qwen3_family import make_hf_qwen3  # noqa: E402

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def build_qwen3_gpt(spec):
    arch = spec.model_family.megatron.architecture_kwargs(spec)
    assert (
        arch["qk_layernorm"]
        and arch["kv_channels"] == spec.head_dim != spec.hidden_size // spec.num_attention_heads
    )
    return build_gpt(spec, spec.vocab_size)


@pytest.mark.usefixtures("mcore_cpu")
@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_hf_to_mcore_logits_and_back(tmp_path, tied):
    hf_model, hf_dir = make_hf_qwen3(tmp_path, tied=tied)
    with torch.no_grad():
        ref = hf_model(TOKENS).logits

    spec, state, _ = api.load_state(hf_dir)
    assert spec.family == "qwen3"
    model = build_qwen3_gpt(spec)
    full = {to_local_spec(k): v for k, v in mapping.reference_to_megatron(state, spec).items()}
    params = dict(model.named_parameters())
    assert params.keys() == full.keys()
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in params
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(full[name])
    diff = (mcore_logits(model, TOKENS) - ref).abs().max().item()
    print(f"tied={tied}: Megatron-Core (local spec, qk_layernorm) vs Qwen3ForCausalLM logits: {diff:.3g}")
    assert diff <= ATOL, diff

    back = megatron.from_megatron(dict(model.state_dict()), spec)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def test_qwen3_qk_norms_are_replicated_over_tp(tmp_path):
    _, hf_dir = make_hf_qwen3(tmp_path)
    spec, state, _ = api.load_state(hf_dir)
    full = mapping.reference_to_megatron(state, spec)
    name = "decoder.layers.0.self_attention.k_layernorm.weight"
    assert full[name].shape == (spec.head_dim,)
    assert mapping.tp_shard(name, full[name], 2, 1, "qwen3") is full[name]
    sharded = megatron.sharded_tensors(full, spec.num_layers, 2, "qwen3")
    assert [k for k in sharded if k.startswith(name + "#")] == [name + "#0"]  # stored once
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert len([k for k in sharded if k.startswith(qkv + "#")]) == 2  # a TP-split weight: one per rank

"""HF weights -> the Megatron engine's weight mapping -> a real Megatron-Core GPTModel, on the CPU (TP=1).

Megatron-Core's local (non-TE) layer spec runs on the CPU once two CUDA-only calls are stubbed (the RoPE
table's device and the CUDA RNG tracker used for attention dropout, which is 0 here). This checks the fused
QKV / fc1 layouts, norm placement and RoPE convention of `engines.megatron_engine.mapping` and the export
adapter `convert.megatron.from_megatron` against transformers; TP=2 with TE runs in
tests/gpu/test_convert_megatron.py. Tolerance: FP32, atol=1e-5.
"""

import contextlib
import socket

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from llmtrain.convert import api, io, megatron  # noqa: E402
from llmtrain.engines.megatron_engine import mapping  # noqa: E402

ATOL = 1e-5
# The engine uses TE layers (norms fused into the next linear); the local spec keeps them separate.
LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def to_local_spec(name: str) -> str:
    for te, local in LOCAL_NAMES.items():
        if name.endswith("." + te):
            return name.removesuffix(te) + local
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mcore_cpu(monkeypatch):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(1, 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(
        tensor_parallel.get_cuda_rng_tracker(),
        "fork",
        lambda *a, **k: contextlib.nullcontext(),
        raising=False,
    )
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def build_gpt(spec, padded_vocab):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=padded_vocab,
        max_sequence_length=spec.seq_length,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
        share_embeddings_and_output_weights=spec.tie_embeddings,
        parallel_output=False,
    ).eval()


def mcore_logits(model, tokens):
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)  # True = masked
    with torch.no_grad():
        return model(tokens, pos, mask).float()


def test_hf_to_mcore_logits_and_back(tmp_path, mcore_cpu):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
    )
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf_model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(tokens).logits

    spec, state, _ = api.load_state(tmp_path / "hf")
    vp = 128  # Megatron-LM pads the vocabulary; the export must drop the padding rows
    model = build_gpt(spec, vp)
    full = mapping.reference_to_megatron(state, spec)
    full = {to_local_spec(k): v for k, v in full.items()}
    params = dict(model.named_parameters())
    assert params.keys() == full.keys()
    with torch.no_grad():
        for name, p in params.items():
            t = full[name]
            p.copy_(torch.cat([t, t.new_zeros(vp - t.shape[0], t.shape[1])]) if p.shape[0] == vp else t)
    diff = (mcore_logits(model, tokens)[..., : spec.vocab_size] - ref).abs().max().item()
    print(f"mcore vs transformers logits max abs diff: {diff:.3g}")
    assert diff <= ATOL, diff

    # Export: Megatron-Core state dict -> llmtrain checkpoint -> HF dir -> transformers, same logits.
    back = megatron.from_megatron(dict(model.state_dict()), spec)  # has None _extra_state entries too
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    ckpt = io.write_checkpoint(
        tmp_path / "ck", back, {"model": {k: getattr(spec, k) for k in spec.__dataclass_fields__}}
    )
    out = api.export_hf(ckpt, tmp_path / "out", with_tokenizer=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with torch.no_grad():
        assert (reloaded(tokens).logits - ref).abs().max().item() <= ATOL

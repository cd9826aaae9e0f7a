"""HF weights -> the Megatron engine's weight mapping -> a real Megatron-Core GPTModel, on the CPU (TP=1).

Megatron-Core's local (non-TE) layer spec runs on the CPU once two CUDA-only calls are stubbed (the RoPE
table's device and the CUDA RNG tracker used for attention dropout, which is 0 here). This checks the fused
QKV / fc1 layouts, norm placement and RoPE convention of `engines.megatron_engine.mapping`, the export
adapter `convert.megatron.from_megatron` and the dist checkpoint `import --engine megatron` writes (read by
Megatron-Core itself into its model) against transformers; TP=2 with TE runs in
tests/gpu/test_convert_megatron.py. Tolerance: FP32, atol=1e-5.
"""

import contextlib
import socket

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from llmtrain import checkpoint_format as fmt  # noqa: E402
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
    """A Megatron-Core GPTModel from the family's own TransformerConfig fields (what the engine uses), with
    the local (non-TE) layer spec and the fused CUDA kernels off, so it runs on the CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = spec.model_family.megatron
    cpu = dict(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,  # the fused kernels are CUDA only
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        TransformerConfig(**(layout.architecture_kwargs(spec) | cpu)),
        get_gpt_layer_local_spec(normalization="RMSNorm", **layout.layer_spec_kwargs()),
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


def tiny_hf_model():
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
    return hf_model


TOKENS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))


def test_hf_to_mcore_logits_and_back(tmp_path, mcore_cpu):
    hf_model = tiny_hf_model()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    tokens = TOKENS
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


def test_import_megatron_tp2_loads_into_mcore_and_exports(tmp_path, mcore_cpu):
    """`import --engine megatron --tp 2 --pp 2`: a dist checkpoint split into the TP=2 shards, which
    Megatron-Core's own loader reads into its (TP=1) GPTModel with transformers' logits, which
    `train.init_from` (api.load_state) reads back bit for bit, and which exports to transformers again."""
    pytest.importorskip("psutil")  # Megatron-Core's checkpoint writer needs it
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader

    from llmtrain.convert.__main__ import main as convert_main
    from llmtrain.engines.megatron_engine.settings import CKPT_METADATA

    hf_model = tiny_hf_model()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        ref = hf_model(TOKENS).logits
    out = tmp_path / "mg"
    args = ["import", str(tmp_path / "hf"), str(out), "--engine", "megatron", "--tp", "2", "--pp", "2"]
    assert convert_main(args) == 0
    manifest = fmt.read_manifest(out)
    assert (manifest["engine"], manifest["layout"]) == ("megatron", {"tp": 2, "pp": 2})
    fmt.verify(out)

    # The TP layout is in the file: per layer, 2 chunks of each TP-split weight, 4 of the fused fc1, 1 norm.
    chunks = {
        k: len(v.chunks)
        for k, v in FileSystemReader(str(out / "megatron")).read_metadata().state_dict_metadata.items()
    }
    assert chunks["decoder.layers.self_attention.linear_qkv.weight"] == 2 * 2
    assert chunks["decoder.layers.mlp.linear_fc1.weight"] == 2 * 4
    assert chunks["decoder.layers.mlp.linear_fc1.layer_norm_weight"] == 2
    assert chunks["embedding.word_embeddings.weight"] == 2

    spec, state, _ = api.load_state(out)
    _, hf_state, _ = api.load_state(tmp_path / "hf")
    assert state.keys() == hf_state.keys() and all(torch.equal(state[k], hf_state[k]) for k in hf_state)

    model = build_gpt(spec, spec.vocab_size)
    wanted = {
        k: v
        for k, v in model.sharded_state_dict(metadata=dict(CKPT_METADATA)).items()
        if not isinstance(v, ShardedObject)  # TE/linear _extra_state: not weights, not imported
    }
    loaded = dist_checkpointing.load(wanted, str(out / "megatron"))
    missing, _ = model.load_state_dict(loaded, strict=False)
    assert all(k.endswith("_extra_state") for k in missing), missing
    diff = (mcore_logits(model, TOKENS) - ref).abs().max().item()
    print(f"import --engine megatron (TP=2 file) in Megatron-Core vs transformers: max abs diff {diff:.3g}")
    assert diff <= ATOL, diff

    exported = api.export_hf(out, tmp_path / "exported", with_tokenizer=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    with torch.no_grad():
        diff2 = (back(TOKENS).logits - ref).abs().max().item()
    print(f"megatron import -> export -> transformers: max abs diff {diff2:.3g}")
    assert diff2 <= ATOL, diff2

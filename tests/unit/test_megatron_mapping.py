"""CPU checks of the Megatron engine's pure parts: weight mapping, TP/CP slicing, config translation."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmtrain.engines.megatron_engine import batches, mapping, settings
from llmtrain.errors import ConfigError, UserError
from llmtrain.models import ModelSpec
from llmtrain.models.llama import LlamaModel
from llmtrain.precision import te_recipes
from tests.megatron_helpers import make_config

SPEC = ModelSpec(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=8,
    num_query_groups=2,
    vocab_size=128,
    seq_length=16,
)


def _ref_state(spec: ModelSpec) -> dict:
    torch.manual_seed(0)
    model = LlamaModel(spec)
    model.init_weights()
    return model.state_dict()


def test_fused_qkv_matches_megatron_attention_split():
    """Split the fused projection the way Megatron's SelfAttention does and compare to q/k/v_proj."""
    sd = _ref_state(SPEC)
    p = "layers.0.self_attn."
    w = mapping.fuse_qkv(sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"], 8, 2)
    x = torch.randn(3, SPEC.hidden_size)
    hd, ng, per = SPEC.head_dim, 2, 4
    mixed = (x @ w.T).view(3, ng, (per + 2) * hd)
    q, k, v = mixed.split([per * hd, hd, hd], dim=-1)
    torch.testing.assert_close(q.reshape(3, -1), x @ sd[p + "q_proj.weight"].T)
    torch.testing.assert_close(k.reshape(3, -1), x @ sd[p + "k_proj.weight"].T)
    torch.testing.assert_close(v.reshape(3, -1), x @ sd[p + "v_proj.weight"].T)


@pytest.mark.parametrize("tied", [False, True])
def test_reference_megatron_round_trip(tied):
    spec = ModelSpec(**{**SPEC.__dict__, "tie_embeddings": tied})
    ref = _ref_state(spec)
    mg = mapping.reference_to_megatron(ref, spec)
    assert ("output_layer.weight" in mg) is not tied
    assert mg["decoder.layers.1.mlp.linear_fc1.weight"].shape == (2 * spec.ffn_hidden_size, spec.hidden_size)
    back = mapping.megatron_to_reference(mg, spec)
    assert back.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(back[k], ref[k], rtol=0, atol=0)


def test_tp_shards():
    ref = _ref_state(SPEC)
    mg = mapping.reference_to_megatron(ref, SPEC)
    qkv = mg["decoder.layers.0.self_attention.linear_qkv.weight"]
    p = "layers.0.self_attn."
    hd = SPEC.head_dim
    # TP rank 1 of 2 holds KV group 1: q heads 4..7, k/v head 1.
    want = mapping.fuse_qkv(
        ref[p + "q_proj.weight"][4 * hd :], ref[p + "k_proj.weight"][hd:], ref[p + "v_proj.weight"][hd:], 4, 1
    )
    torch.testing.assert_close(
        mapping.tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", qkv, 2, 1), want
    )
    fc1 = mapping.tp_shard(
        "decoder.layers.0.mlp.linear_fc1.weight", mg["decoder.layers.0.mlp.linear_fc1.weight"], 2, 0
    )
    half = SPEC.ffn_hidden_size // 2
    torch.testing.assert_close(
        fc1,
        torch.cat([ref["layers.0.mlp.gate_proj.weight"][:half], ref["layers.0.mlp.up_proj.weight"][:half]]),
    )
    proj = mapping.tp_shard(
        "decoder.layers.0.self_attention.linear_proj.weight",
        mg["decoder.layers.0.self_attention.linear_proj.weight"],
        2,
        1,
    )
    torch.testing.assert_close(proj, ref["layers.0.self_attn.o_proj.weight"][:, SPEC.hidden_size // 2 :])
    emb = mapping.tp_shard("embedding.word_embeddings.weight", mg["embedding.word_embeddings.weight"], 4, 3)
    assert emb.shape == (SPEC.vocab_size // 4, SPEC.hidden_size)
    norm = mg["decoder.final_layernorm.weight"]
    assert mapping.tp_shard("decoder.final_layernorm.weight", norm, 2, 1) is norm


def test_local_to_global_name():
    assert (
        mapping.local_to_global_name("decoder.layers.1.mlp.linear_fc2.weight", [5, 6])
        == "decoder.layers.5.mlp.linear_fc2.weight"
    )
    assert mapping.local_to_global_name("output_layer.weight", [5, 6]) == "output_layer.weight"


def test_cp_slice_load_balanced():
    t = torch.arange(16).view(1, 16)
    r0, r1 = batches.cp_slice(t, 2, 0), batches.cp_slice(t, 2, 1)
    assert r0.tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert r1.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert batches.cp_slice(t, 1, 0) is t


def test_resolve_layout():
    cfg = make_config("llama3_8b", parallel="megatron_8b")
    spec = ModelSpec.from_config(cfg.model)
    assert settings.resolve_layout(cfg.parallel, spec, 8).dp == 8
    cfg.parallel.tp, cfg.parallel.sequence_parallel = 2, True
    lay = settings.resolve_layout(cfg.parallel, spec, 8)
    assert (lay.tp, lay.dp, lay.sequence_parallel) == (2, 4, True)
    cfg.parallel.tp = 3
    with pytest.raises(ConfigError, match=r"parallel.tp"):
        settings.resolve_layout(cfg.parallel, spec, 6)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = 1, 2, 3  # 32 layers % 6 != 0
    with pytest.raises(ConfigError, match=r"parallel.pp"):
        settings.resolve_layout(cfg.parallel, spec, 2)
    cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.dp = 1, 1, 3
    with pytest.raises(ConfigError, match=r"parallel.dp"):
        settings.resolve_layout(cfg.parallel, spec, 2)
    # the engine's check is preflight's (config/layout.py): sequence parallelism at tp=1 is refused, not dropped
    cfg.parallel.dp, cfg.parallel.sequence_parallel = 0, True
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=True: needs parallel.tp > 1"):
        settings.resolve_layout(cfg.parallel, spec, 2)


def _settings(name, capability, **precision):
    return te_recipes.precision_settings(
        make_config(precision=name, overrides={"precision": precision}).precision, capability
    )


def test_precision_settings_native_where_te_can():
    hopper, blackwell = (9, 0), (10, 0)
    assert _settings("bf16", hopper)[0] == {}
    kw, desc = _settings("fp8_cs", hopper)
    # Bridge's bf16_with_fp8_current_scaling_mixed: first and last transformer layer in BF16.
    bf16_ends = {
        "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 1,
    }
    assert kw == {"fp8": "hybrid", "fp8_recipe": "tensorwise", **bf16_ends} and "Float8CurrentScaling" in desc
    # ... and with no BF16 layers (Bridge's throughput configs: precision=variant/fp8_cs_all_layers).
    kw = _settings("fp8_cs", hopper, bf16_layers={"first": 0, "last": 0})[0]
    assert kw == {"fp8": "hybrid", "fp8_recipe": "tensorwise"}
    assert _settings("mxfp8", blackwell)[0] == {"fp8": "e4m3", "fp8_recipe": "mxfp8"}
    kw, desc = _settings("nvfp4", blackwell)
    assert kw["fp4"] == "e2m1" and kw["fp4_recipe"] == "nvfp4" and "native" in desc
    assert kw["num_layers_at_end_in_bf16"] == 4 and kw["first_last_layers_bf16"]


def test_precision_settings_emulate_what_te_cannot_run_natively():
    hopper, blackwell = (9, 0), (10, 0)
    factory = "llmtrain.precision.te_custom.qfactory"
    for name in ("mxfp8", "nvfp4", "nvfp4_fp4all"):  # Hopper: no native MX/NV formats
        kw, desc = _settings(name, hopper)
        assert factory in kw.values() and "emulated" in desc and "compute capability >= 10.0" in desc, name
    assert _settings("mxfp8", hopper)[0]["fp8_recipe"] == "custom"
    assert _settings("nvfp4", hopper)[0]["fp4_recipe"] == "custom"
    # Knobs TE's native recipes fix, or the monitor / QAF, need our quantizers even on Blackwell.
    kw, desc = _settings("nvfp4_fp4all", blackwell)
    assert kw["fp4_recipe"] == "custom" and "precision.weight_block_2d" in desc
    kw, desc = _settings("nvfp4", blackwell, rht=False)
    assert kw["fp4_recipe"] == "custom" and "precision.rht" in desc
    assert _settings("fp8_cs", hopper, backend="custom")[0]["fp8_recipe"] == "custom"
    with pytest.raises(UserError, match=r"use precision\.backend=custom"):
        _settings("nvfp4", hopper, backend="native")
    with pytest.raises(UserError, match=r"precision\.rht"):
        _settings("nvfp4", blackwell, rht=False, backend="native")
    with pytest.raises(ConfigError, match=r"precision.backend"):
        _settings("fp8_cs", hopper, backend="torch")


def test_transformer_config_kwargs():
    cfg = make_config(
        "llama3_8b", precision="fp8_cs", parallel="megatron_8b", overrides={"parallel": {"recompute": "full"}}
    )
    spec = ModelSpec.from_config(cfg.model)
    lay = settings.resolve_layout(cfg.parallel, spec, 1)
    kw = settings.transformer_config_kwargs(spec, cfg.parallel, lay, {"fp8": "hybrid"})
    assert kw["num_query_groups"] == 8 and kw["kv_channels"] == 128 and kw["normalization"] == "RMSNorm"
    assert kw["gated_linear_unit"] and not kw["add_bias_linear"] and kw["fp8"] == "hybrid"
    assert kw["recompute_granularity"] == "full" and kw["gradient_accumulation_fusion"]
    okw = settings.optimizer_config_kwargs(cfg.optim, cfg.parallel)
    assert okw["use_distributed_optimizer"] and okw["adam_beta2"] == cfg.optim.beta2


def test_set_lr_follows_wd_mult():
    Opt = SimpleNamespace(
        param_groups=[{"lr": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}, {"lr": torch.tensor(0.0)}]
    )

    settings.set_lr(Opt, 1e-3, 0.1)
    assert Opt.param_groups[0]["lr"] == 1e-3 and Opt.param_groups[0]["weight_decay"] == 0.0
    assert (
        float(Opt.param_groups[1]["lr"]) == pytest.approx(1e-3) and Opt.param_groups[1]["weight_decay"] == 0.1
    )


def test_import_is_lazy_and_cpu_fails_cleanly():
    code = (
        "import sys, llmtrain.engines.megatron_engine as m\n"
        "assert 'transformer_engine' not in sys.modules and 'megatron.core' not in sys.modules\n"
        "from llmtrain.dist import DistInfo\n"
        "from tests.megatron_helpers import make_config\n"
        "import torch\n"
        "if not torch.cuda.is_available():\n"
        "    from llmtrain.errors import UserError\n"
        "    try:\n"
        "        m.MegatronEngine(make_config(), DistInfo())\n"
        "    except UserError as e:\n"
        "        assert 'CUDA' in str(e)\n"
        "    else:\n"
        "        raise AssertionError('expected UserError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_checkpoint_write_results_stay_in_process():
    """Megatron's writer must not depend on a Manager process that a preemption SIGTERM kills (see
    checkpoint.keep_write_results_in_process); fails if Megatron renames the hook we set."""
    import queue
    import warnings

    from llmtrain.engines.megatron_engine import checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.dist_checkpointing.strategies import filesystem_async

    checkpoint.keep_write_results_in_process()
    assert isinstance(filesystem_async._results_queue, queue.Queue)


def test_async_checkpoint_request_writes_the_snapshot_not_the_trained_state(tmp_path):
    """Megatron's async save request, as the engine's start_save uses it, on CPU (gloo, one rank): a tensor
    changed in place after the snapshot must not reach the file (Megatron leaves CPU tensors uncopied)."""
    code = (
        "import os, sys, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from pathlib import Path\n"
        "torch.distributed.init_process_group('gloo', init_method=f'file://{sys.argv[1]}/pg', rank=0, world_size=1)\n"
        "from megatron.core import dist_checkpointing\n"
        "from megatron.core.dist_checkpointing import ShardedTensor\n"
        "from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy\n"
        "from llmtrain.engines.megatron_engine import checkpoint\n"
        "path = Path(sys.argv[1]) / 'ckpt'; path.mkdir()\n"
        "w = torch.arange(1000, dtype=torch.float32)\n"
        "checkpoint.keep_write_results_in_process()\n"
        "request = dist_checkpointing.save({'w': ShardedTensor.from_rank_offsets('w', w)}, str(path),\n"
        "    sharded_strategy=get_default_save_sharded_strategy(), async_sharded_save=True)\n"
        "pending = checkpoint.pending_write(request)\n"
        "w.add_(1.0)  # the next training step\n"
        "pending.write()\n"
        "torch.cuda.current_device = lambda: 'cpu'  # Megatron's finalize all-reduces on the GPU; gloo here\n"
        "pending.finalize()\n"
        "out = dist_checkpointing.load({'w': ShardedTensor.from_rank_offsets('w', torch.empty(1000))}, str(path))\n"
        "assert torch.equal(out['w'], torch.arange(1000, dtype=torch.float32)), out['w'][:4]\n"
        "torch.distributed.destroy_process_group()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)

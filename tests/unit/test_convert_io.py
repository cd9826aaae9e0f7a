"""Unit tests of llmtrain.convert: checkpoint files, names/shapes, config translation, Megatron layouts."""

import json

import pytest
import torch

from llmtrain import checkpoint_format as fmt
from llmtrain.convert import hf, io, megatron
from llmtrain.convert.api import init_weights_from, load_model_state
from llmtrain.errors import CheckpointError, UserError
from llmtrain.models.llama import LlamaModel
from llmtrain.models.spec import ModelSpec
from tests.helpers import small_llama_spec

SPEC = small_llama_spec()


def _model(spec=SPEC, seed=0):
    model = LlamaModel(spec)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _state(model):
    state = dict(model.state_dict())
    if model.spec.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def _write_run(tmp_path, model, step=7):
    """A run dir following the torch engine's checkpoint contract."""
    ckpts = tmp_path / "run" / "checkpoints"
    step_dir = ckpts / fmt.step_dir_name(step)
    model_cfg = {k: getattr(model.spec, k) for k in model.spec.__dataclass_fields__}
    io.write_checkpoint(
        step_dir, _state(model), {"model": model_cfg, "data": {"tokenizer": "builtin"}}, step=step
    )
    (ckpts / "latest").write_text(fmt.step_dir_name(step) + "\n")
    return tmp_path / "run", step_dir


@pytest.mark.parametrize("tied", [False, True])
def test_expected_shapes_match_llama_model(tied):
    spec = ModelSpec(**{**SPEC.__dict__, "tie_embeddings": tied})
    model = _model(spec)
    assert hf.expected_shapes(spec) == {k: tuple(v.shape) for k, v in _state(model).items()}


def test_names_round_trip():
    for name in hf.expected_shapes(SPEC):
        hf_name = hf.llmtrain_to_hf_name(name)
        assert hf_name == (name if name == "lm_head.weight" else "model." + name)
        assert hf.hf_to_llmtrain_name(hf_name) == name
    assert hf.hf_to_llmtrain_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_parse_size():
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("40KB") == 40_000
    assert hf.parse_size("2MiB") == 2 * 2**20
    assert hf.parse_size(123) == 123
    with pytest.raises(UserError, match="not a size"):
        hf.parse_size("big")


def test_config_translation_round_trip():
    cfg = hf.hf_config_from_spec(SPEC, eos_token_id=0)
    back = hf.model_config_from_hf(cfg, name=SPEC.name)
    assert ModelSpec(**back) == SPEC
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings is False and cfg.eos_token_id == 0


def test_checkpoint_write_resolve_load(tmp_path):
    model = _model()
    run, step_dir = _write_run(tmp_path, model)
    for path in (run, run / "checkpoints", step_dir):
        assert fmt.resolve_checkpoint(path) == step_dir
    manifest = fmt.read_manifest(step_dir)
    assert manifest["step"] == 7 and manifest["engine"] == "torch" and manifest["format_version"] == 1
    assert manifest["files"]["model.safetensors"] == fmt.sha256_file(step_dir / "model.safetensors")
    state = io.load_model_state(step_dir)
    assert all(torch.equal(state[k], v) for k, v in _state(model).items())
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))  # temp dir renamed away


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fmt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no llmtrain checkpoint"):
        fmt.resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000001")
    with pytest.raises(CheckpointError, match="points to step_00000001"):
        fmt.resolve_checkpoint(tmp_path)


def test_corrupt_model_file_detected(tmp_path):
    _, step_dir = _write_run(tmp_path, _model())
    with open(step_dir / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        io.load_model_state(step_dir)


def test_atomic_output_dir(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), fmt.atomic_output_dir(dest) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # nothing half-written
    with fmt.atomic_output_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(UserError, match=r"already exists.*--force"), fmt.atomic_output_dir(dest):
        pass
    with fmt.atomic_output_dir(dest, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_init_weights_from_checkpoint(tmp_path):
    src = _model(seed=1)
    run, _ = _write_run(tmp_path, src)
    dst = _model(seed=2)
    init_weights_from(str(run), dst)
    tokens = torch.randint(0, SPEC.vocab_size, (2, 8))
    assert torch.equal(src(tokens), dst(tokens))


def test_init_weights_from_missing_path(tmp_path):
    with pytest.raises(
        UserError, match="does not exist; pass a Hugging Face Llama directory or an llmtrain run"
    ):
        init_weights_from(str(tmp_path / "nope"), _model())


def test_init_weights_from_architecture_mismatch(tmp_path):
    run, _ = _write_run(tmp_path, _model())
    other = _model(ModelSpec(**{**SPEC.__dict__, "num_layers": 3}))
    with pytest.raises(
        UserError, match=r"model.num_layers=3 but the checkpoint has 2; set model.num_layers=2"
    ):
        init_weights_from(str(run), other)


def test_init_weights_from_tensor_shape_mismatch(tmp_path):
    _, step_dir = _write_run(tmp_path, _model())
    state = io.load_model_state(step_dir)
    state["layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    bad = tmp_path / "bad"
    cfg = fmt.read_config(step_dir)
    io.write_checkpoint(bad, state, {"model": dict(cfg.model)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for layers.1.mlp.up_proj.weight: checkpoint \[40, 32\]"
    ):
        init_weights_from(str(bad), _model())
    del state["layers.1.mlp.up_proj.weight"]
    io.write_checkpoint(bad, state, {"model": dict(cfg.model)}, force=True)
    with pytest.raises(CheckpointError, match=r"missing tensor layers.1.mlp.up_proj.weight \(1 missing\)"):
        init_weights_from(str(bad), _model())


def _hf_config_dir(tmp_path, **overrides):
    cfg = hf.hf_config_from_spec(SPEC).to_dict() | overrides
    d = tmp_path / "hfcfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_non_llama_config_rejected(tmp_path):
    d = _hf_config_dir(tmp_path, model_type="mistral")
    with pytest.raises(UserError, match="model_type='mistral' is not supported"):
        hf.read_hf_config(d)


def test_unsupported_llama_variants_rejected(tmp_path):
    d = _hf_config_dir(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0}, attention_bias=True)
    d_cfg = json.loads((d / "config.json").read_text())
    d_cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (d / "config.json").write_text(json.dumps(d_cfg))
    with pytest.raises(UserError, match=r"unsupported Llama variant: rope scaling 'llama3'.*biases"):
        hf.read_hf_config(d)


@pytest.mark.parametrize(
    ("key", "value", "want"),
    [
        ("hidden_size", "abc", "a positive integer"),
        ("num_hidden_layers", 2.5, "a positive integer"),
        ("vocab_size", True, "a positive integer"),
        ("intermediate_size", 0, "a positive integer"),
        ("num_key_value_heads", "2", "a positive integer or null"),
        ("rms_norm_eps", "1e-6", "a number"),
        ("tie_word_embeddings", "false", "true or false"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_one_line(tmp_path, key, value, want):
    d = _hf_config_dir(tmp_path, **{key: value})
    expected = f"{d / 'config.json'}: {key}={json.dumps(value)} must be {want}; fix it in config.json"
    with pytest.raises(CheckpointError) as e:
        hf.read_hf_config(d)
    assert str(e.value) == expected


def test_a_config_json_that_is_not_an_object_is_one_line(tmp_path):
    d = _hf_config_dir(tmp_path)
    (d / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list, not an object"):
        hf.read_hf_config(d)


def test_pickle_only_dir_rejected(tmp_path):
    d = _hf_config_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="only pickle weights"):
        hf.hf_weight_files(d)


# --- Megatron engine checkpoints (export side) -------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_from_megatron_stacked_layers_prefixes_padding(tied):
    from llmtrain.engines.megatron_engine.mapping import reference_to_megatron

    spec = ModelSpec(**{**SPEC.__dict__, "tie_embeddings": tied})
    state = _state(_model(spec))
    full = dict(state) | ({"lm_head.weight": state["embed_tokens.weight"]} if tied else {})
    mc = reference_to_megatron(full, spec)
    # As dist_checkpointing stores them: layers stacked along a new dim 0, `model.` prefix, TE extra state,
    # optimizer entries, and vocab rows padded (as Megatron-LM does for TP).
    stacked: dict = {}
    for k, v in mc.items():
        if k.startswith("decoder.layers."):
            stacked.setdefault("model.decoder.layers." + k.split(".", 3)[3], []).append(v)
        else:
            stacked["model." + k] = torch.cat([v, torch.zeros(28, 32)]) if v.shape[0] == 100 else v
    stacked = {k: torch.stack(v) if isinstance(v, list) else v for k, v in stacked.items()}
    stacked["model.decoder.layers.self_attention.linear_qkv._extra_state"] = torch.zeros(1)
    stacked["optimizer.state.exp_avg.decoder.final_layernorm.weight"] = torch.zeros(32)
    back = megatron.from_megatron(stacked, spec)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match=r"stacks 2 layers but model.num_layers=3"):
        megatron.from_megatron(stacked, ModelSpec(**{**spec.__dict__, "num_layers": 3}))


def test_megatron_checkpoint_without_dist_dir(tmp_path):
    _, step_dir = _write_run(tmp_path, _model())
    manifest = json.loads((step_dir / "manifest.json").read_text()) | {"engine": "megatron"}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        CheckpointError, match=r"no Megatron-Core checkpoint \(megatron/metadata.json missing\)"
    ):
        load_model_state(step_dir)


def test_megatron_import_without_psutil_is_one_line(tmp_path, monkeypatch):
    """Megatron-Core's checkpoint writer forks workers that die without psutil (the save would then wait
    forever): the import refuses up front, before reading weights or creating the output."""
    real = megatron.importlib.util.find_spec
    monkeypatch.setattr(
        megatron.importlib.util, "find_spec", lambda name: None if name == "psutil" else real(name)
    )
    with pytest.raises(UserError, match=r"needs psutil .* pip install psutil"):
        megatron.import_to_megatron({}, SPEC, tmp_path / "out", config={}, tp=2, pp=1, force=False, extra={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_sharded_tensors_tile_the_full_weights(tp):
    """The ShardedTensors an import writes cover every stored (layer-stacked) tensor exactly once and
    reassemble to it; a TP-split weight is `tp` shards, the fused fc1 2*tp, a norm one."""
    pytest.importorskip("megatron.core")
    from llmtrain.engines.megatron_engine.mapping import reference_to_megatron

    full = reference_to_megatron(_state(_model()), SPEC)
    sharded = megatron.sharded_tensors(full, SPEC.num_layers, tp)
    stored, cover, count = {}, {}, {}
    for sh in sharded.values():
        if sh.key not in stored:
            stored[sh.key] = torch.full(sh.global_shape, float("nan"))
            cover[sh.key] = torch.zeros(sh.global_shape)
        index = tuple(
            slice(o, o + n) for o, n in zip(sh.global_offset, (1,) * sh.prepend_axis_num + sh.local_shape)
        )
        stored[sh.key][index] = sh.data.reshape((1,) * sh.prepend_axis_num + sh.local_shape)
        cover[sh.key][index] += 1
        count[sh.key] = count.get(sh.key, 0) + 1
    assert all(bool((c == 1).all()) for c in cover.values())  # each element written exactly once
    stacked = megatron.unstack_layers(stored, SPEC.num_layers)
    assert stacked.keys() == full.keys() and all(torch.equal(stacked[k], full[k]) for k in full)
    layers = SPEC.num_layers
    assert count["decoder.layers.self_attention.linear_qkv.weight"] == layers * tp
    assert count["decoder.layers.mlp.linear_fc2.weight"] == layers * tp
    assert count["decoder.layers.mlp.linear_fc1.weight"] == layers * (2 * tp if tp > 1 else 1)
    assert count["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == layers
    assert count["embedding.word_embeddings.weight"] == tp

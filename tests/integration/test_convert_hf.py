"""HF <-> llmtrain round trips against transformers (CPU, FP32, offline).

Tolerance: logits compared with atol=1e-5, rtol=0 (FP32; the two implementations do the same math; the
differences measured are printed, `pytest -s` shows them: about 1e-7 or exactly 0).
"""

import json
import lzma
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmtrain import checkpoint_format as fmt  # noqa: E402
from llmtrain.convert import api, io  # noqa: E402
from llmtrain.convert.__main__ import main as convert_main  # noqa: E402
from llmtrain.data import build_data, load_tokenizer  # noqa: E402
from llmtrain.errors import CheckpointError, UserError  # noqa: E402
from llmtrain.models.llama import LlamaModel, causal_lm_loss  # noqa: E402
from llmtrain.models.spec import ModelSpec  # noqa: E402
from tests.helpers import REPO, hf_logits, save_tiny_hf_model  # noqa: E402

ATOL = 1e-5


def make_hf_model(tmp_path, tied=False, dtype=torch.float32, name="hf"):
    """A tiny random LlamaForCausalLM saved sharded (several safetensors files + index)."""
    return save_tiny_hf_model(tmp_path, transformers.LlamaConfig, transformers.LlamaForCausalLM, tied=tied,
                              name=name, dtype=dtype, rope_theta=50000.0)  # fmt: skip


def llmtrain_model(ckpt):
    cfg = fmt.read_config(fmt.resolve_checkpoint(ckpt))
    model = LlamaModel(ModelSpec.from_config(cfg.model)).eval()
    api.init_weights_from(str(ckpt), model)
    return model


TOKENS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_import_logits_export_reload(tmp_path, tied):
    hf_model, hf_dir = make_hf_model(tmp_path, tied=tied)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # really sharded
    ref = hf_logits(hf_model, TOKENS)

    ckpt = api.import_hf(hf_dir, tmp_path / "ckpt")
    manifest = fmt.read_manifest(ckpt)
    assert manifest["step"] == 0 and set(manifest["files"]) == {"model.safetensors", "config.yaml"}
    ours = llmtrain_model(ckpt)
    with torch.no_grad():
        diff = (ours(TOKENS) - ref).abs().max().item()
    print(f"tied={tied}: torch engine model vs transformers logits, max abs diff {diff:.3g}")
    assert diff <= ATOL, diff

    out = api.export_hf(ckpt, tmp_path / "export", max_shard_size="50KB")
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(names)
    assert sum(n.startswith("model-") for n in names) > 1
    assert not list(tmp_path.glob(".export*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 50000.0 and config["tie_word_embeddings"] is tied
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    diff2 = (hf_logits(reloaded, TOKENS) - ref).abs().max().item()
    print(f"tied={tied}: import -> export -> transformers vs original, max abs diff {diff2:.3g}")
    assert diff2 <= ATOL, diff2


def test_bf16_hf_weights_import_as_fp32(tmp_path):
    hf_model, hf_dir = make_hf_model(tmp_path, dtype=torch.bfloat16)
    ckpt = api.import_hf(hf_dir, tmp_path / "ckpt")
    state = io.load_model_state(ckpt)
    assert all(t.dtype == torch.float32 for t in state.values())
    ref = hf_model.state_dict()["model.layers.1.mlp.down_proj.weight"].float()
    assert torch.equal(state["layers.1.mlp.down_proj.weight"], ref)


@pytest.mark.parametrize("sharded", [True, False])
def test_init_from_hf_dir_directly(tmp_path, sharded):
    hf_model, hf_dir = make_hf_model(tmp_path)
    if not sharded:
        hf_dir = tmp_path / "single"
        hf_model.save_pretrained(str(hf_dir))
        assert (hf_dir / "model.safetensors").is_file()
    cfg = api.describe_source(hf_dir)[1]
    model = LlamaModel(cfg).eval()
    api.init_weights_from(str(hf_dir), model)
    with torch.no_grad():
        assert (model(TOKENS) - hf_logits(hf_model, TOKENS)).abs().max().item() <= ATOL
    wrong = LlamaModel(ModelSpec(**{**cfg.__dict__, "vocab_size": 256}))
    with pytest.raises(
        UserError, match=r"model.vocab_size=256 but the checkpoint has 128; set model.vocab_size=128"
    ):
        api.init_weights_from(str(hf_dir), wrong)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("llmtrain-cache")


TINY = dict(
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=4096,
    seq_length=32,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny run trained 8 steps on the shipped corpus and saved as the torch engine does (the whole
    resolved config in config.yaml, model.safetensors, manifest, `latest`)."""
    from omegaconf import OmegaConf

    from llmtrain.config.schema import Config

    cfg = OmegaConf.structured(Config)
    cfg.model.merge_with({"name": "tiny_test", **TINY})
    cfg.train.merge_with({"steps": 8, "micro_batch_size": 4, "global_batch_size": 4, "eval_steps": 2})
    cfg.data.cache_dir = str(cache_dir)
    data = build_data(cfg, dp_rank=0, dp_size=1)
    model = LlamaModel(ModelSpec.from_config(cfg.model))
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(cfg.train.steps):
        (mb,) = data.train_batch(step)
        loss = causal_lm_loss(model(mb["tokens"]), mb["labels"], mb["loss_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("trained") / "run"
    step_dir = run / "checkpoints" / fmt.step_dir_name(cfg.train.steps)
    io.write_checkpoint(step_dir, model.state_dict(), OmegaConf.to_container(cfg), step=cfg.train.steps)
    (run / "checkpoints" / "latest").write_text(step_dir.name)
    return model.eval(), run, data


def test_trained_checkpoint_round_trip_with_tokenizer(tmp_path, trained):
    model, run, data = trained
    tokens = data.valid_batches(1)[0]["tokens"]
    with torch.no_grad():
        ref = model(tokens)

    out = api.export_hf(run, tmp_path / "hf_out", dtype="float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    diff = (hf_logits(hf_model, tokens) - ref).abs().max().item()
    print(f"trained checkpoint -> export -> transformers vs llmtrain logits, max abs diff {diff:.3g}")
    assert diff <= ATOL, diff
    assert (out / "model.safetensors").is_file()  # 1.4 MB < 5GB: a single file, no index

    # Tokenizer files: transformers' tokenizer encodes exactly as llmtrain's, EOS = <|endoftext|>.
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "In the beginning God created the heaven and the earth."
    assert tok(text)["input_ids"] == load_tokenizer("builtin").encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and hf_model.config.eos_token_id == 0

    # And back: HF -> llmtrain gives the identical weights.
    back = api.import_hf(out, tmp_path / "back")
    state, orig = io.load_model_state(back), model.state_dict()
    assert state.keys() == orig.keys() and all(torch.equal(state[k], orig[k]) for k in orig)
    assert (back / "tokenizer" / "tokenizer.json").is_file()
    assert fmt.read_config(back).data.tokenizer == str(back / "tokenizer")
    again = api.export_hf(back, tmp_path / "hf_again")  # the copied HF tokenizer dir is re-saved as is
    tok2 = transformers.AutoTokenizer.from_pretrained(str(again), local_files_only=True)
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] and tok2.eos_token_id == 0

    # bf16 export (from the checkpoints/ dir): BF16 weights, no tokenizer when asked.
    out16 = api.export_hf(run / "checkpoints", tmp_path / "hf16", dtype="bfloat16", with_tokenizer=False)
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out16 / "tokenizer.json").exists()
    m16 = transformers.AutoModelForCausalLM.from_pretrained(str(out16), local_files_only=True)
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_eval_perplexity(trained):
    from llmtrain.eval import evaluate

    model, run, data = trained
    res = evaluate(run, steps=2, device="cpu")
    with torch.no_grad():
        mbs = data.valid_batches(2)
        ref = sum(float(causal_lm_loss(model(m["tokens"]), m["labels"], m["loss_mask"])) for m in mbs) / len(
            mbs
        )
    assert res["step"] == 8 and res["tokens"] == 2 * 4 * 32
    assert abs(res["valid_loss"] - ref) < 1e-4 and math.isclose(
        res["perplexity"], math.exp(res["valid_loss"])
    )
    assert res["perplexity"] < 4096  # better than uniform after a few steps


def test_eval_cli_lm_eval_errors_come_before_the_perplexity_run(trained, capsys, monkeypatch):
    import sys

    from llmtrain.eval import main as eval_main

    _, run, _ = trained
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert eval_main([str(run), "--steps", "1", "--lm-eval", "hellaswag"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "pip install 'lm-eval[hf]'" in err, err


def test_eval_lm_eval_local_task(tmp_path, trained):
    """Where lm-eval[hf] is installed: the checkpoint is exported to a temp HF dir and scored by lm-eval's
    `hf` model on a local two-choice task (true continuation of a corpus line vs another line's)."""
    pytest.importorskip("lm_eval.models.huggingface")
    from llmtrain.eval import lm_eval_tasks

    _, run, _ = trained
    with lzma.open(REPO / "llmtrain" / "corpus" / "kjv.jsonl.xz", "rt") as f:
        words = json.loads(f.readline())["text"].split()[10:200]
    rows = []
    for i in range(10):  # 6 words of context, then 6 words: its own or those of 5 lines later
        own, other = words[12 * i : 12 * i + 12], words[12 * (i + 5) : 12 * (i + 5) + 12]
        rows.append(
            {"context": " ".join(own[:6]), "choices": [" " + " ".join(own[6:]), " " + " ".join(other[6:])]}
        )
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r | {"label": 0}) + "\n" for r in rows))
    task = {
        "task": "llmtrain_local_continuation",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "task.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    res = lm_eval_tasks(run, [task], limit=None, device="cpu", dtype="float32")
    print(f"lm-eval local task: {res}")
    metrics = res["llmtrain_local_continuation"]
    assert metrics["sample_len"] == 10 and 0.0 <= metrics["acc,none"] <= 1.0


def test_error_missing_shard(tmp_path):
    _, hf_dir = make_hf_model(tmp_path)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard.name}"):
        api.import_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_error_shape_mismatch_in_hf_weights(tmp_path):
    _, hf_dir = make_hf_model(tmp_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128  # config and weights disagree
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for layers.0.mlp.gate_proj.weight: checkpoint \[160, 64\]"
    ):
        api.import_hf(hf_dir, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == [hf_dir]


def test_cli_import_export_and_errors(tmp_path, capsys):
    _, hf_dir = make_hf_model(tmp_path)
    assert convert_main(["import", str(hf_dir), str(tmp_path / "ck")]) == 0
    assert convert_main(["export", str(tmp_path / "ck"), str(tmp_path / "ex"), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    # Output exists: refused without --force, one line, exit code 2; with --force replaced.
    assert convert_main(["export", str(tmp_path / "ck"), str(tmp_path / "ex")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert convert_main(["export", str(tmp_path / "ck"), str(tmp_path / "ex"), "--force"]) == 0
    # Non-Llama config.
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert convert_main(["import", str(hf_dir), str(tmp_path / "ck2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type='gpt2' is not supported" in err
    # A layout the model does not allow (4 heads, 2 KV groups): the engine's own rule, nothing written.
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    assert (
        convert_main(["import", str(hf_dir), str(tmp_path / "ck3"), "--engine", "megatron", "--tp", "3"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.num_attention_heads=4: must be divisible by parallel.tp=3" in err
    assert not (tmp_path / "ck3").exists()


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def _edit_config(hf_dir, **changes):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | changes))


# Each case breaks a copy of a good sharded HF dir: (how, text expected in the one error line).
BAD_INPUTS = {
    "missing_shard": (
        lambda d: (d / "model-00002-of-00010.safetensors").unlink(),
        "missing shard model-00002-of-00010.safetensors",
    ),
    "truncated_shard_data": (
        lambda d: _truncate(d / "model-00003-of-00010.safetensors", lambda n: n - 100),
        "model-00003-of-00010.safetensors (Error while deserializing header: incomplete metadata",
    ),
    "truncated_shard_header": (
        lambda d: _truncate(d / "model-00001-of-00010.safetensors", lambda n: 20),
        "the file is corrupt or not safetensors",
    ),
    "model_type_mistral": (
        lambda d: _edit_config(d, model_type="mistral"),
        "model_type='mistral' is not supported; llmtrain converts model_type 'llama', 'qwen3'",
    ),
    "model_type_gpt2": (lambda d: _edit_config(d, model_type="gpt2"), "model_type='gpt2' is not supported"),
    "config_not_json": (
        lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
        "config.json is not valid JSON",
    ),
    "shape_mismatch": (
        lambda d: _edit_config(d, intermediate_size=128),
        "shape mismatch for layers.0.mlp.gate_proj.weight: checkpoint [160, 64] vs model [128, 64]",
    ),
    "llama31_rope_scaling": (
        lambda d: _edit_config(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "unsupported Llama variant: rope scaling 'llama3'",
    ),
}


@pytest.fixture(scope="module")
def good_hf_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("good"))[1]


@pytest.mark.parametrize("engine", ["torch", "megatron"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_hf_dir_one_line_exit_2_nothing_written(tmp_path, capsys, good_hf_dir, case, engine):
    import shutil

    hf_dir = tmp_path / "hf"
    shutil.copytree(good_hf_dir, hf_dir)
    breaks, expected = BAD_INPUTS[case]
    breaks(hf_dir)
    assert convert_main(["import", str(hf_dir), str(tmp_path / "out" / "ck"), "--engine", engine]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # not even the output's parent


def test_cli_missing_paths_and_existing_outputs(tmp_path, capsys, good_hf_dir):
    def fails(*args, expected):
        assert convert_main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err

    fails("import", str(tmp_path / "nope"), str(tmp_path / "ck"), expected="nope is not a directory")
    fails("import", str(tmp_path), str(tmp_path / "ck"), expected="config.json not found")
    fails("export", str(tmp_path / "nope"), str(tmp_path / "ex"), expected="nope does not exist")
    fails("export", str(good_hf_dir), str(tmp_path / "ex"), expected="no llmtrain checkpoint at")
    assert list(tmp_path.iterdir()) == []
    # An existing output is never touched without --force (import and export, either engine).
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    for engine in ("torch", "megatron"):
        fails("import", str(good_hf_dir), str(tmp_path / "ck"), "--engine", engine, expected="already exists")
    fails("export", str(tmp_path / "ck"), str(tmp_path / "ck"), expected="already exists")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["keep.txt"]


def test_cli_train_init_from_hf_dir_then_export(tmp_path, cache_dir):
    """`python -m llmtrain ... train.init_from=HF_DIR` starts from the HF weights (its first loss is the HF
    model's loss on the first batch), and the trained run exports back to transformers."""
    from omegaconf import OmegaConf

    from tests.helpers import FAST, read_metrics, run_cli_in_process

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    run_dir = tmp_path / "run"
    run_cli_in_process(
        *FAST,
        "train.steps=2",
        "train.checkpoint_interval=2",
        f"train.init_from={tmp_path / 'hf'}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        check=True,
    )
    first_loss = read_metrics(run_dir)[0]["loss"]
    data = build_data(OmegaConf.load(run_dir / "config.yaml"), dp_rank=0, dp_size=1)
    with torch.no_grad():
        mbs = data.train_batch(0)
        hf_loss = sum(
            float(causal_lm_loss(hf_model(m["tokens"]).logits, m["labels"], m["loss_mask"])) for m in mbs
        ) / len(mbs)
    print(f"init_from HF: first training loss {first_loss:.6f}, transformers loss {hf_loss:.6f}")
    assert abs(first_loss - hf_loss) < 1e-4, (first_loss, hf_loss)

    out = api.export_hf(run_dir, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tokens = mbs[0]["tokens"]
    diff = (hf_logits(reloaded, tokens) - llmtrain_model(run_dir)(tokens).detach()).abs().max().item()
    print(f"CLI-trained run -> export -> transformers vs llmtrain logits, max abs diff {diff:.3g}")
    assert diff <= ATOL, diff


@pytest.mark.parametrize("tied", [False, True])
def test_eval_load_model_matches_transformers(tmp_path, tied):
    from llmtrain.eval import load_model

    hf_model, hf_dir = make_hf_model(tmp_path, tied=tied)
    model = load_model(hf_dir)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert (model(TOKENS) - hf_logits(hf_model, TOKENS)).abs().max().item() <= ATOL

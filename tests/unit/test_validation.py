"""Every user error is one ConfigError line naming the key, the bad value and what is allowed."""

import pytest

from llmtrain.cli import preflight
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from llmtrain.errors import UserError

register_configs()
register_resolvers()

PP8 = ["recipe=llama3_8b", "parallel.pp=8", "cluster.gpus_per_node=8", "dry_run=true"]  # 4 layers a stage
CASES = [
    (["train.foo=1"], "train.foo=1: unknown key 'foo' in train (allowed: check_memory"),
    (["+foo=1"], "foo=1: unknown key 'foo' (allowed: cluster, data"),
    (["train.steps=abc"], "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (
        ["precision=fp7"],
        "precision=fp7: no such precision config (allowed: bf16, fp8_cs, mxfp4, mxfp8, nvfp4, nvfp4_fp4all)",
    ),
    (
        ["recipe=nope"],
        "recipe=nope: no such recipe config (allowed: gpu_study, llama3_1b, llama3_8b, precision_sweep, qwen3_tiny, research_8b, tiny)",
    ),
    (["precision.name=fp16"], "precision.name='fp16': not a valid choice (allowed: bf16, fp8_cs"),
    (
        ["precision.grad_format=fp16"],
        "precision.grad_format='fp16': not a valid choice (allowed: bf16, fp8_e4m3",
    ),
    (
        ["optim.schedule=linear"],
        "optim.schedule='linear': not a valid choice (allowed: cosine, wsd, constant)",
    ),
    (
        ["logging.wandb.mode=maybe"],
        "logging.wandb.mode='maybe': not a valid choice (allowed: offline, online",
    ),
    (
        ["engine=megatron", "dry_run=true", "model.num_attention_heads=7"],
        "model.hidden_size=256: must be divisible by model.num_attention_heads=7",
    ),
    (
        ["engine=megatron", "dry_run=true", "parallel.tp=3", "cluster.gpus_per_node=3"],
        "model.num_attention_heads=8: must be divisible by parallel.tp=3",
    ),
    (
        ["engine=megatron", "dry_run=true", "parallel.pp=3", "cluster.gpus_per_node=3"],
        "model.num_layers=4: must be divisible by parallel.pp*vpp=3",
    ),
    (["engine=megatron", "dry_run=true", "parallel.tp=2"], "tp*pp*cp=2 must divide the world size 1"),
    (
        ["train.init_from=/nonexistent/llama"],
        "train.init_from='/nonexistent/llama': path does not exist; give an HF model directory",
    ),
    # checked at the engine build only before: no GPU makes a native MXFP4 recipe exist
    (
        ["engine=megatron", "dry_run=true", "precision=mxfp4", "precision.backend=native"],
        "precision.backend='native': precision=mxfp4 has no TE native recipe; use precision.backend=custom",
    ),
    # issue 19.4: checked at the engine build only before, so the dry run said "fits"
    (
        [
            "engine=megatron",
            "dry_run=true",
            "cluster.gpus_per_node=2",
            "parallel.tp=2",
            "model.vocab_size=4097",
        ],
        "model.vocab_size=4097: must be divisible by parallel.tp=2",
    ),
    (
        ["engine=megatron", "dry_run=true", "parallel.overlap_param_gather=true"],
        "parallel.overlap_param_gather=True: needs parallel.distributed_optimizer=true",
    ),
    (
        ["engine=megatron", "dry_run=true", "parallel.vpp=2", "parallel.pp=1"],
        "parallel.vpp=2: virtual stages need",
    ),
    (
        ["train.global_batch_size=12"],
        "train.global_batch_size=12: must be divisible by micro_batch_size*dp=8",
    ),
    (["parallel.tp=2"], "the torch engine is data parallel only; use engine=megatron"),
    (
        ["data.paths=[/nonexistent/corpus]"],
        "data.paths='/nonexistent/corpus': /nonexistent/corpus.bin not found",
    ),
    (["data.paths=[0.5,/a,0.5]"], "a blend is [weight1, prefix1, weight2, prefix2, ...]"),
    (["train.resume=/no/such/ckpt"], "train.resume='/no/such/ckpt': checkpoint path does not exist"),
    (["engine=megatron"], "engine='megatron': needs CUDA, megatron-core and transformer-engine"),
    (["recipe=llama3_8b"], "llama3_8b needs ~"),
    # ranges of every numeric key (issue 16 item 10): each of these crashed mid-run or ran silently
    (["logging.interval=0"], "logging.interval=0: must be > 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be > 0"),
    (["train.seed=-1"], "train.seed=-1: must be in [0, 4294967296)"),
    (["train.eval_interval=5", "train.eval_steps=0"], "train.eval_steps=0: must be > 0"),
    (["train.checkpoint_interval=-1"], "train.checkpoint_interval=-1: must be >= 0"),
    (["train.keep_last=-2"], "train.keep_last=-2: must be >= 0"),
    (["optim.beta2=1.0"], "optim.beta2=1.0: must be in [0, 1)"),
    (["optim.eps=0"], "optim.eps=0.0: must be > 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be >= 0"),
    (["optim.decay_fraction=1.5"], "optim.decay_fraction=1.5: must be in [0, 1]"),
    (["model.norm_eps=0"], "model.norm_eps=0.0: must be > 0"),
    (["dry_run=true", "cluster.nodes=0"], "cluster.nodes=0: must be > 0"),
    (["dry_run=true", "cluster.gpus_per_node=0"], "cluster.gpus_per_node=0: must be > 0"),
    (["cluster.requeue_limit=-1"], "cluster.requeue_limit=-1: must be >= 0"),
    (["data.split='90,x,0'"], "data.split='90,x,0': not comma-separated numbers"),
    (["data.split='0,10,0'"], "needs 1-3 weights >= 0 (train,valid,test) with train > 0"),
    (["data.split=90,10,0"], "a comma on the command line makes a sweep, which runs only with -m"),
    (["data.tokenizer=nope"], "data.tokenizer='nope': no tokenizer at nope (allowed: a tokenizer.json"),
    (["data.builtin=nope"], "data.builtin='nope': unknown built-in corpus (allowed: kjv)"),
    (
        [*PP8, "precision=fp8_cs", "precision.bf16_layers.last=6"],
        "precision.bf16_layers.last=6: Megatron-Core's FP8 path keeps at most num_layers/pp = 32/8 = 4 layers",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_user_error_is_one_clear_line(overrides, expected):
    if overrides == ["engine=megatron"]:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    with pytest.raises(UserError) as info:
        preflight(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_sweep_points_are_each_validated():
    with pytest.raises(UserError, match=r"optim\.schedule='bogus'"):
        preflight(["-m", "optim.schedule=cosine,bogus"])


def test_a_sweep_error_names_its_point():
    with pytest.raises(UserError) as info:
        preflight(["-m", "optim.lr=1e-3,-1"])
    assert str(info.value) == "sweep point 1 (optim.lr=-1): optim.lr=-1.0: must be > 0"
    with pytest.raises(UserError) as info:
        preflight(["-m", "optim.lr=-1"])  # one point: nothing to tell apart
    assert str(info.value) == "optim.lr=-1.0: must be > 0"


def test_a_sweep_larger_than_the_check_says_so(monkeypatch, capsys):
    import llmtrain.cli as cli

    monkeypatch.setattr(cli, "MAX_VALIDATED_SWEEP_POINTS", 2)
    preflight(["-m", "optim.schedule=cosine,wsd,bogus"])  # the third point is not checked up front ...
    assert "checked the first 2 of 3 sweep points" in capsys.readouterr().err  # ... and says so
    preflight(["-m", "optim.lr=1e-3,2e-3"])
    assert "checked the first" not in capsys.readouterr().err


def test_a_dry_run_plans_without_the_data_files(tmp_path):
    """A plan (maybe for a cluster's files): the data files are read only by a run."""
    missing = f"data.paths=[{tmp_path}/nothing]"
    preflight(["recipe=tiny", missing, "dry_run=true"])
    with pytest.raises(UserError, match=r"nothing\.bin not found"):
        preflight(["recipe=tiny", missing])


def test_valid_overrides_pass():
    preflight(["-m", "recipe=tiny", "optim.lr=1e-3,3e-3", "train.steps=20"])
    preflight(["recipe=llama3_8b", "precision=nvfp4", "dry_run=true"])
    # Megatron-Core's FP4 path has no per-stage limit on BF16 layers; the FP8 one does (CASES)
    preflight([*PP8, "precision=nvfp4", "precision.bf16_layers.last=6"])
    preflight([*PP8, "precision=fp8_cs", "precision.bf16_layers.last=4"])


def test_a_recipe_defined_sweep_is_validated_before_any_point_runs():
    # recipes/precision_sweep.yaml sweeps precision variants with hydra.sweeper.params; on a 1-layer model
    # its "last 1 layer in BF16" points quantize nothing, which preflight must catch up front.
    with pytest.raises(UserError, match=r"precision\.bf16_layers=.*keeps all 1 transformer layers"):
        preflight(["-m", "recipe=precision_sweep", "model.num_layers=1"])
    # CLI wins (fp8_cs keeps its first and last layer in BF16, so on 1 layer: the variant with none)
    preflight(
        ["-m", "recipe=precision_sweep", "precision=bf16,variant/fp8_cs_all_layers", "model.num_layers=1"]
    )


TOOL_CASES = [
    ("llmtrain.convert", ["import", "/x", "/y", "--tp", "0"], "argument --tp: 0 must be >= 1"),
    ("llmtrain.convert", ["import", "/x", "/y", "--pp", "two"], "argument --pp: 'two' is not an integer"),
    ("llmtrain.convert", ["export", "/x", "/y", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("llmtrain.convert", ["export", "/x", "/y", "--max-shard-size", "0"], "--max-shard-size '0' must be > 0"),
    ("llmtrain.eval", ["/x", "--steps", "0"], "argument --steps: 0 must be >= 1"),
    ("llmtrain.eval", ["/x", "--micro-batch-size", "-1"], "argument --micro-batch-size: -1 must be >= 1"),
    ("llmtrain.eval", ["/x", "--seq-length", "1"], "argument --seq-length: 1 must be >= 2"),
    ("llmtrain.eval", ["/x", "--limit", "0"], "argument --limit: 0 must be >= 1"),
    ("llmtrain.eval", ["/x", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("llmtrain.data.prepare", ["input=/x", "tokenizer=builtin", "output=/y", "workers=-5"], "workers=-5: must be >= -1"),
    ("llmtrain.data.prepare", ["input=/x", "tokenizer=builtin", "output=/y", "batch_mb=0"], "batch_mb=0.0: must be > 0"),
    ("llmtrain.data.prepare", ["input=/x", "tokenizer=builtin", "output=/y", "commit_mb=-1"], "commit_mb=-1.0: must be > 0"),
    ("llmtrain.data.prepare", ["input=/x", "tokenizer=builtin", "output=/y", "txt_mode=word"], "txt_mode='word': not a valid choice"),
]  # fmt: skip


@pytest.mark.parametrize(("module", "argv", "expected"), TOOL_CASES, ids=[" ".join(c[1]) for c in TOOL_CASES])
def test_tool_flags_are_range_checked_in_one_line(module, argv, expected, capsys):
    import importlib

    main = importlib.import_module(module + (".__main__" if module == "llmtrain.convert" else "")).main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bad_key_or_value_in_a_recipe_file_names_the_key_and_the_file(tmp_path):
    from llmtrain.cli import resolve_recipes

    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "typo.yaml").write_text("# @package _global_\ntrain:\n  stepz: 3\n")
    (tmp_path / "recipe" / "word.yaml").write_text("# @package _global_\ntrain:\n  steps: abc\n")
    with pytest.raises(UserError) as info:
        preflight(resolve_recipes(["--config-dir", str(tmp_path), "recipe=typo"]))
    assert str(info.value).startswith(
        "train.stepz (in recipe/typo.yaml): unknown key 'stepz' in train (allowed:"
    )
    with pytest.raises(UserError) as info:
        preflight(resolve_recipes(["--config-dir", str(tmp_path), "recipe=word"]))
    assert str(info.value) == (
        "train.steps (in recipe/word.yaml): Value 'abc' of type 'str' could not be converted to Integer"
    )


def test_recipe_file_errors_name_the_file_and_line(tmp_path):
    from llmtrain.cli import resolve_recipes

    bad = tmp_path / "bad.yaml"
    bad.write_text("# @package _global_\ntrain:\n  steps: 7\n  seed: [1\n")
    with pytest.raises(UserError, match=rf"recipe={bad}: {bad}:5: YAML error: expected ','"):
        resolve_recipes([f"recipe={bad}"])
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  steps: 7\n")
    with pytest.raises(UserError, match=r"must start with the line '# @package _global_'"):
        resolve_recipes([f"recipe={plain}"])
    with pytest.raises(UserError, match=r"no such file"):
        resolve_recipes([f"recipe={tmp_path / 'none.yaml'}"])
    with pytest.raises(UserError, match=r"file:// entries only"):
        resolve_recipes(["hydra.searchpath=[pkg://x]", "recipe=mine"])
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ntrain: [\n")
    with pytest.raises(UserError, match=r"recipe=mine: .*mine\.yaml:3: YAML error"):
        resolve_recipes(["--config-dir", str(tmp_path), "recipe=mine"])

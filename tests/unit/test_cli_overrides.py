"""llmtrain/overrides.py: the jobs of a `-m` sweep as Hydra's own sweeper makes them, and each shape of a
Hydra/OmegaConf composition error as one line."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf.errors import ConfigKeyError

from llmtrain.cli import CONFIG_DIR, preflight
from llmtrain.config.resolvers import register_resolvers
from llmtrain.config.schema import register_configs
from llmtrain.errors import UserError
from llmtrain.overrides import (
    check_flags_and_positionals,
    describe_composition_error,
    first_line,
    parse_override,
    sweep_points,
)

register_configs()
register_resolvers()


@pytest.fixture
def hydra_ready():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_sweep_points_are_the_jobs_hydra_runs(hydra_ready):
    assert sweep_points(["optim.lr=1e-3,2e-3", "train.steps=5"]) == [
        ["optim.lr=0.001", "train.steps=5"],
        ["optim.lr=0.002", "train.steps=5"],
    ]
    # a recipe's own sweep (hydra.sweeper.params) is expanded; the command line wins on the same key
    assert len(sweep_points(["recipe=precision_sweep"])) == 12
    assert sweep_points(["recipe=precision_sweep", "precision=bf16,fp8_cs"]) == [
        ["precision=bf16", "recipe=precision_sweep"],
        ["precision=fp8_cs", "recipe=precision_sweep"],
    ]
    # a swept recipe is left out of the composition that reads hydra.sweeper.params, as in Hydra's multirun
    assert sweep_points(["recipe=tiny,precision_sweep"]) == [["recipe=tiny"], ["recipe=precision_sweep"]]
    assert sweep_points(["optim.lr=1e-3,2e-3", "optim.lr=5e-3"]) == [["optim.lr=0.005"]]  # the last one wins
    assert sweep_points(["model=glob(tin*)"]) == [["model=tiny"]]  # glob() needs Hydra's config loader


def test_a_swept_recipe_checks_only_the_jobs_hydra_runs():
    """precision_sweep's 12 variants are not swept when the recipe itself is (Hydra runs 2 jobs), so their
    1-layer refusals must not stop this command."""
    preflight(["-m", "recipe=tiny,precision_sweep", "model.num_layers=1"])
    preflight(["-m", "model=glob(tin*)"])


def test_a_sweep_larger_than_the_check_gives_its_exact_size(monkeypatch, capsys):
    import llmtrain.cli as cli

    monkeypatch.setattr(cli, "MAX_VALIDATED_SWEEP_POINTS", 2)
    preflight(["-m", "recipe=precision_sweep"])
    assert "preflight: checked the first 2 of 12 sweep points;" in capsys.readouterr().err


def test_a_glob_over_a_group_never_runs_its_schema_entry_as_a_job(hydra_ready):
    """Hydra lists precision_schema among precision's options: a glob would run it as a job of its own."""
    with pytest.raises(UserError, match=r"^precision=glob\(\.\.\.\): also matches the schema entry") as e:
        sweep_points(["precision=glob(*,exclude=[nvfp4*])"])
    assert "list the options instead: precision=bf16,fp8_cs,mxfp4,mxfp8" in str(e.value)


@pytest.mark.parametrize("sweep", ["precision=glob(nope*)", "precsion=glob(*)"])
def test_a_sweep_of_no_job_is_one_line_not_a_silent_success(hydra_ready, sweep):
    with pytest.raises(UserError, match=r"expands to no job; check the glob\(\) pattern and the group name"):
        sweep_points([sweep])


def test_an_unsupported_sweep_is_one_line():
    with pytest.raises(
        UserError, match=r"^cannot parse overrides optim\.lr=interval\(0,1\): BasicSweeper does"
    ):
        preflight(["-m", "optim.lr=interval(0,1)"])


def composition_error(*overrides: str) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            from omegaconf import OmegaConf

            OmegaConf.to_container(compose(config_name="train", overrides=list(overrides)), resolve=True)
        except Exception as e:
            return describe_composition_error(e, list(overrides))
        finally:
            GlobalHydra.instance().clear()
    raise AssertionError(f"{overrides} composed")


SHAPES = [
    # Hydra's MissingConfigException: its missing_cfg_file and options, the schema configs left out
    (["model=nope"], "model=nope: no such model config (allowed: llama3_1b, llama3_8b, qwen3_0_6b, qwen3_tiny,"),
    # OmegaConf's key errors on a structured config: the full_key, and the schema's keys as the choices
    (["train.nested.x=1"], "train.nested: unknown key 'nested' in train (allowed: check_memory, checkpoint_async,"),
    (["foo=1"], "foo=1: unknown key 'foo' in the config (allowed: cluster, data, dry_run,"),
    # text only (first_line): OmegaConf's msg with full_key/reference_type lines after the problem
    (["train.steps=abc"], "train.steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["~train.steps"], "~train.steps: TrainConfig (DictConfig) does not support deletion"),
    (["optim.lr=${oops}"], "optim.lr=${oops}: Interpolation key 'oops' not found"),
    # text only: a Hydra error with no cause and no key
    (["+precision=bf16"], "precision appears more than once in the final defaults list"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), SHAPES, ids=[s[0][0] for s in SHAPES])
def test_each_composition_error_shape_is_one_line(overrides, expected):
    message = composition_error(*overrides)
    assert message.startswith(expected) and "\n" not in message, message


def test_a_key_error_on_a_key_the_schema_has_is_not_called_unknown():
    """OmegaConf raises ConfigKeyError for more than unknown keys ("Missing key", "Key not found" in a
    resolver): the schema decides whether the key is unknown."""
    cause = ConfigKeyError("Key not found: 'x'\n    full_key: train.steps")
    cause.key, cause.full_key, cause.msg = "steps", "train.steps", str(cause)
    exc = RuntimeError("Error merging override train.steps=${oc.dict.keys:x}")
    exc.__cause__ = cause
    assert describe_composition_error(exc, ["train.steps=${oc.dict.keys:x}"]) == (
        "train.steps=${oc.dict.keys:x}: Key not found: 'x'"
    )


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            ValueError("Value 'abc' of type 'str' could not be converted\n    full_key: train.steps"),
            "Value 'abc'",
        ),
        (ValueError("\n  leading blank lines\nnext"), "leading blank lines"),
        (ValueError(""), "ValueError"),
    ],
)
def test_first_line_is_the_problem(exc, line):
    assert first_line(exc).startswith(line) and "\n" not in first_line(exc)


def test_a_sweep_of_a_recipe_outside_the_repo(tmp_path, hydra_ready):
    """The search path reaches the composition that reads the recipe's own sweep, and every job."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      optim.lr: 1e-3,2e-3\n"
    )
    search = f"hydra.searchpath=['file://{tmp_path}']"
    assert sweep_points(["recipe=mine", "train.seed=1,2", search]) == [
        [search, "optim.lr=0.001", "recipe=mine", "train.seed=1"],
        [search, "optim.lr=0.001", "recipe=mine", "train.seed=2"],
        [search, "optim.lr=0.002", "recipe=mine", "train.seed=1"],
        [search, "optim.lr=0.002", "recipe=mine", "train.seed=2"],
    ]


COMMAND_LINES = [
    # Hydra: "ValueError: The --resolve flag can only be used in conjunction with --cfg or --help"
    (["--resolve", "recipe=tiny"], "--resolve only changes how --cfg prints the config; write --cfg job --resolve"),
    # Hydra: "Error parsing override 'train.steps' / missing EQUAL at '<EOF>'" and 3 more lines
    (["recipe=tiny", "train.steps"], "train.steps: not a key=value override; write train.steps=VALUE"),
    # Hydra: "ValueError: Only one of --run, --multirun, --cfg, --info and --shell_completion ..."
    (["-m", "recipe=tiny", "train.steps=1,2", "--cfg", "job"],
     "--multirun and --cfg: Hydra does one of them per command; drop all but one"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "expected"), COMMAND_LINES, ids=["resolve", "no-equals", "two-commands"])
def test_what_hydra_refuses_with_a_traceback_is_one_line_in_preflight(argv, expected):
    with pytest.raises(UserError) as e:
        preflight(argv)
    assert str(e.value) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["--cfg", "job", "--resolve", "recipe=tiny"],
        ["~train.seed", "--cfg", "job"],
        ["-c", "job", "-p", "train"],
    ],
)
def test_what_hydra_accepts_passes_the_check(argv):
    check_flags_and_positionals(argv)


def test_parse_error_gives_the_quoted_form():
    with pytest.raises(UserError) as e:
        parse_override("eos=<|endoftext|>")
    assert str(e.value).startswith("eos=<|endoftext|>: cannot parse it (")
    assert str(e.value).endswith("""; write it as "eos='<|endoftext|>'\"""")


@pytest.mark.parametrize("argv", [COMMAND_LINES[0][0], COMMAND_LINES[1][0]], ids=["resolve", "no-equals"])
def test_the_command_exits_2_with_the_line(argv):
    from tests.helpers import run_cli_in_process

    proc = run_cli_in_process(*argv)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc

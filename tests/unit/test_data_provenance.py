"""Training data is checked against what it was prepared with (the manifest's tokenizer sha256 and
vocab_size), and a corpus too short for model.seq_length says what is short and what would fit."""

import json
import re
import shutil

import pytest

from llmtrain.cli import preflight
from llmtrain.config.schema import register_configs
from llmtrain.config.validate import validate_data
from llmtrain.data import build_data
from llmtrain.data.pipeline import PrepareOptions, prepare
from llmtrain.data.tokenizer import CORPUS_DIR
from llmtrain.errors import ConfigError, UserError
from tests.helpers import schema_config

register_configs()

WORDS = [
    "in",
    "the",
    "beginning",
    "god",
    "created",
    "the",
    "heaven",
    "and",
    "the",
    "earth",
    "and",
    "the",
    "earth",
    "was",
    "without",
    "form",
]


def make_cfg(cache_dir, **over):
    base = {"model.seq_length": 16, "train.steps": 2, "train.global_batch_size": 2}
    base |= {"train.micro_batch_size": 1, "train.eval_steps": 1, "train.seed": 1}
    return schema_config(cache_dir, **(base | over))


def _prepare(src, tokenizer, prefix):
    prepare(
        PrepareOptions([str(src)], str(tokenizer), str(prefix), progress=False, workers=-1),
        log=lambda _: None,
    )
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """b: prepared with the builtin tokenizer; g: with a copy that has one more token (4097, another sha);
    old: b's files with a manifest from before the tokenizer record; small: 30 documents of 4 words."""
    d = tmp_path_factory.mktemp("provenance")
    rows = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + i % 20)) for i in range(300)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (d / "small.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i % 9 : i % 9 + 4])}) + "\n" for i in range(30))
    )
    big = json.loads((CORPUS_DIR / "tokenizer.json").read_text())
    big["added_tokens"].append({**big["added_tokens"][0], "id": 4096, "content": "<|extra|>"})
    (d / "big").mkdir()
    (d / "big" / "tokenizer.json").write_text(json.dumps(big))
    paths = {
        "b": _prepare(d / "docs.jsonl", "builtin", d / "b"),
        "g": _prepare(d / "docs.jsonl", d / "big", d / "g"),
        "small": _prepare(d / "small.jsonl", "builtin", d / "small"),
        "big": str(d / "big"),
        "cache": str(d / "cache"),
    }
    for suffix in (".bin", ".idx"):
        shutil.copy(d / f"g{suffix}", d / f"old{suffix}")
    manifest = json.loads((d / "g.manifest.json").read_text())
    del manifest["tokenizer"]["sha256"], manifest["tokenizer"]["vocab_size"]
    (d / "old.manifest.json").write_text(json.dumps(manifest))
    paths["old"] = str(d / "old")
    return paths


def refused_both_ways(cfg, expected: str) -> None:
    """Preflight's check and build_data's refuse it with the same line."""
    with pytest.raises(ConfigError, match=expected):
        validate_data(cfg.data, cfg.model.vocab_size)
    with pytest.raises(ConfigError, match=expected):
        build_data(cfg, dp_rank=0, dp_size=1)


def check_both(cfg):
    """Preflight's check (the manifest only) and build_data's must agree."""
    validate_data(cfg.data, cfg.model.vocab_size)
    return build_data(cfg, dp_rank=0, dp_size=1)


@pytest.mark.parametrize("spec", ["builtin", str(CORPUS_DIR), str(CORPUS_DIR / "tokenizer.json")])
def test_the_same_tokenizer_however_named_trains(data, spec):
    built = check_both(make_cfg(data["cache"], **{"data.paths": [data["b"]], "data.tokenizer": spec}))
    assert len(built.train) > 0


def test_a_tokenizer_given_as_a_directory_or_its_file_matches_its_data(data):
    for spec in (data["big"], data["big"] + "/tokenizer.json"):
        over = {"data.paths": [data["g"]], "data.tokenizer": spec, "model.vocab_size": 4097}
        assert len(check_both(make_cfg(data["cache"], **over)).train) > 0


def test_data_whose_ids_reach_past_the_embedding_is_refused(data):
    """Was an IndexError traceback at step 1 (ids >= model.vocab_size)."""
    cfg = make_cfg(data["cache"], **{"data.paths": [data["g"]], "data.tokenizer": "builtin"})
    expected = (
        rf"model.vocab_size=4096: {data['g']} was prepared with a tokenizer of 4097 tokens "
        rf"\({data['big']}/tokenizer.json\).*set model.vocab_size>=4097 and "
        rf"data.tokenizer={data['big']}/tokenizer.json, or re-prepare {data['g']} with tokenizer=builtin$"
    )
    refused_both_ways(cfg, expected)


@pytest.mark.parametrize("which", ["g", "b"])
def test_data_prepared_with_another_tokenizer_is_refused(data, which):
    """Was a silent run on ids that mean other strings, where they fit model.vocab_size."""
    other = {"g": "builtin", "b": data["big"]}[which]
    cfg = make_cfg(
        data["cache"], **{"data.paths": [data[which]], "data.tokenizer": other, "model.vocab_size": 8192}
    )
    used = {"g": f"{data['big']}/tokenizer.json", "b": "builtin"}[which]
    expected = (
        rf"data.tokenizer='{other}': {data[which]} was prepared with another tokenizer \({used}, sha256 \w{{12}}; "
        rf"data.tokenizer's is \w{{12}}\); set data.tokenizer={used}, or re-prepare {data[which]} with "
        rf"tokenizer={other}$"
    )
    refused_both_ways(cfg, expected)


def test_the_cli_refuses_it_in_preflight_in_one_line(data):
    with pytest.raises(UserError) as info:
        preflight(["recipe=tiny", f"data.paths=[{data['g']}]", "data.tokenizer=builtin"])
    assert str(info.value).startswith("model.vocab_size=4096: ") and "\n" not in str(info.value)


def test_data_prepared_before_the_manifest_recorded_the_tokenizer_still_trains(data, tmp_path):
    over = {"data.paths": [data["old"]], "data.tokenizer": "builtin", "model.vocab_size": 8192}
    assert len(check_both(make_cfg(data["cache"], **over)).train) > 0
    for suffix in (".bin", ".idx"):  # no manifest at all
        shutil.copy(data["old"] + suffix, tmp_path / f"bare{suffix}")
    over["data.paths"] = [str(tmp_path / "bare")]
    assert len(check_both(make_cfg(data["cache"], **over)).train) > 0


def test_a_list_of_prefixes_without_weights_passes_preflight(data):
    """parse_blend reads [a, b, c] as three prefixes; preflight took an odd-length list for a bad blend."""
    cfg = make_cfg(data["cache"], **{"data.paths": [data["b"], data["b"], data["b"]]})
    validate_data(cfg.data, cfg.model.vocab_size)
    cfg.data.paths = [data["b"], data["g"]]  # and checks every prefix of it, not every second one
    with pytest.raises(ConfigError, match=r"data.tokenizer='builtin': .*g was prepared with another"):
        validate_data(cfg.data, 8192)


def _suggested(message: str, pattern: str) -> str:
    found = re.search(pattern, message)
    assert found, message
    return found.group(1)


def test_a_corpus_too_short_for_the_sequence_says_what_is_short_and_what_fits(data):
    """Was "data.split='949,50,1': leaves no training data (allowed: e.g. "data.split='949,50,1'")"."""
    over = {"data.paths": [data["small"]], "model.seq_length": 256, "data.split": "949,50,1"}
    with pytest.raises(ConfigError) as info:
        build_data(make_cfg(data["cache"], **over), dp_rank=0, dp_size=1)
    message = str(info.value)
    assert re.match(
        r"model.seq_length=256: a training sample takes 257 tokens but the train share of "
        r"data.split='949,50,1' holds \d+ \(of \d+\) in .*small; use model.seq_length<=\d+ "
        r"\(<=\d+ with train.eval_interval=0\), or more data$",
        message,
    ), message
    seq = int(_suggested(message, r"model.seq_length<=(\d+) "))
    fitted = build_data(make_cfg(data["cache"], **{**over, "model.seq_length": seq}), dp_rank=0, dp_size=1)
    assert len(fitted.train) > 0 and fitted.valid is not None  # the suggestion trains and evaluates


def test_a_split_that_fits_is_suggested_where_one_does(data):
    over = {"data.paths": [data["small"]], "model.seq_length": 64, "data.split": "20,80,0"}
    with pytest.raises(ConfigError, match=r"train share of data.split='20,80,0' holds") as info:
        build_data(make_cfg(data["cache"], **over), dp_rank=0, dp_size=1)
    split = _suggested(str(info.value), r"(?:use |or )data.split='(\d+,\d+,0)'")
    assert split != "20,80,0"
    fitted = build_data(make_cfg(data["cache"], **{**over, "data.split": split}), dp_rank=0, dp_size=1)
    assert len(fitted.train) > 0 and fitted.valid is not None


def test_a_valid_share_too_short_for_the_sequence_says_so_at_evaluation(data):
    """Was "data.split='(no valid share)': evaluation needs a valid split (allowed: e.g. ...'949,50,1')"."""
    over = {"data.paths": [data["small"]], "model.seq_length": 64, "data.split": "96,4,0"}
    built = build_data(make_cfg(data["cache"], **over), dp_rank=0, dp_size=1)
    assert built.valid is None
    with pytest.raises(UserError) as info:
        built.valid_batches(1)
    message = str(info.value)
    assert message.startswith(
        "model.seq_length=64: an evaluation sample takes 65 tokens but the valid share of data.split='96,4,0' holds"
    ), message
    assert message.endswith(", or more data, or train.eval_interval=0") and "949,50,1" not in message
    split = _suggested(message, r"(?:use |or )data.split='(\d+,\d+,0)'")
    fitted = build_data(make_cfg(data["cache"], **{**over, "data.split": split}), dp_rank=0, dp_size=1)
    assert len(fitted.train) > 0 and len(fitted.valid_batches(1)) == fitted.num_micro_batches()


def test_an_exported_copy_with_a_post_processor_maps_text_to_the_same_ids_and_trains(data, tmp_path):
    """An HF export of the builtin tokenizer adds a post-processor (prepare never applies one): another
    sha256, the same ids; data prepared with builtin trains with it. A changed vocabulary is still refused."""
    exported = json.loads((CORPUS_DIR / "tokenizer.json").read_text())
    exported["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [],
        "pair": [],
        "special_tokens": {},
    }
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(exported))
    over = {"data.paths": [data["b"]], "data.tokenizer": str(tmp_path / "hf")}
    assert len(check_both(make_cfg(data["cache"], **over)).train) > 0
    exported["model"]["vocab"] = {k: (v + 1) % 4096 for k, v in exported["model"]["vocab"].items()}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(exported))
    with pytest.raises(ConfigError, match="was prepared with another tokenizer"):
        validate_data(make_cfg(data["cache"], **over).data, 4096)

"""Training side of the data pipeline: build_data over megatron.core.datasets (sampling contract,
DP independence, exact resume, blending ratios, user errors)."""

import json
import lzma

import numpy as np
import pytest
import torch

from llmtrain.data import build_data
from llmtrain.data.pipeline import PrepareOptions, prepare
from llmtrain.data.tokenizer import CORPUS_DIR
from llmtrain.errors import ConfigError, UserError
from tests.helpers import schema_config


def make_cfg(cache_dir, **over):
    base = {"model.seq_length": 64, "train.steps": 10, "train.global_batch_size": 8}
    base |= {"train.micro_batch_size": 2, "train.eval_steps": 2, "train.seed": 1234}
    return schema_config(cache_dir, **(base | over))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llmtrain-cache")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Old and New Testament as two datasets (for blending)."""
    d = tmp_path_factory.mktemp("blend")
    with lzma.open(CORPUS_DIR / "kjv.jsonl.xz", "rt") as f:
        lines = f.readlines()
    (d / "ot.jsonl").write_text("".join(lines[:929]))
    (d / "nt.jsonl").write_text("".join(lines[929:]))
    for name in ("ot", "nt"):
        prepare(
            PrepareOptions([str(d / f"{name}.jsonl")], "builtin", str(d / name), progress=False, workers=-1),
            log=lambda _: None,
        )
    return d


def test_default_builtin_batches(cache):
    data = build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    assert data.vocab_size == 4096 and data.num_micro_batches() == 4
    batches = data.train_batch(0)
    assert len(batches) == 4
    b = batches[0]
    assert b["tokens"].shape == (2, 64) and b["tokens"].dtype == torch.int64
    assert b["labels"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])  # labels are the next tokens
    assert int(b["tokens"].max()) < 4096
    assert len(data.valid_batches(2)) == 8


def test_sampling_is_dp_independent_and_resumes_exactly(cache):
    full = build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    ranks = [build_data(make_cfg(cache), dp_rank=r, dp_size=2) for r in range(2)]
    for step in (0, 7):
        ref = torch.cat([mb["tokens"] for mb in full.train_batch(step)])  # samples in global order
        # micro-batch j of rank r holds samples j*mbs*dp + r*mbs + [0, mbs)
        got = torch.cat([torch.cat([rk.train_batch(step)[j]["tokens"] for rk in ranks]) for j in range(2)])
        assert torch.equal(ref, got)
    # A fresh process (a resume) asking for step 5 gets exactly what the first run saw at step 5.
    again = build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    for a, b in zip(full.train_batch(5), again.train_batch(5)):
        assert torch.equal(a["tokens"], b["tokens"])
    assert full.fingerprint and full.fingerprint == again.fingerprint
    # Steps differ from each other, and the seed changes the order.
    assert not torch.equal(full.train_batch(0)[0]["tokens"], full.train_batch(1)[0]["tokens"])
    other = build_data(make_cfg(cache, **{"train.seed": 7}), dp_rank=0, dp_size=1)
    assert not torch.equal(full.train_batch(0)[0]["tokens"], other.train_batch(0)[0]["tokens"])


def test_data_seed_fixes_the_order_whatever_the_train_seed(cache):
    """data.seed (the study's "same tokens in the same order, other init and SR seeds")."""
    a = build_data(make_cfg(cache, **{"train.seed": 1, "data.seed": 99}), dp_rank=0, dp_size=1)
    b = build_data(make_cfg(cache, **{"train.seed": 2, "data.seed": 99}), dp_rank=0, dp_size=1)
    assert a.fingerprint == b.fingerprint
    for step in (0, 3):
        assert torch.equal(a.train_batch(step)[0]["tokens"], b.train_batch(step)[0]["tokens"])
    unset = build_data(make_cfg(cache, **{"train.seed": 99}), dp_rank=0, dp_size=1)  # None = train.seed
    assert torch.equal(a.train_batch(0)[0]["tokens"], unset.train_batch(0)[0]["tokens"])


def test_valid_is_held_out_and_fixed(cache):
    data = build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    v1, v2 = data.valid_batches(2), data.valid_batches(2)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(v1, v2))
    train_rows = {tuple(r.tolist()) for s in range(10) for mb in data.train_batch(s) for r in mb["tokens"]}
    assert not any(tuple(r.tolist()) in train_rows for mb in v1 for r in mb["tokens"])


def test_blend_ratios_over_10k_samples(two_datasets, cache):
    d = two_datasets
    cfg = make_cfg(cache, **{"data.paths": [0.3, str(d / "ot"), 0.7, str(d / "nt")], "model.seq_length": 32})
    cfg.train.update(steps=1250, global_batch_size=8, micro_batch_size=8)
    data = build_data(cfg, dp_rank=0, dp_size=1)
    ids = np.array([int(data.train[i]["dataset_id"]) for i in range(10_000)])
    assert abs((ids == 0).mean() - 0.3) < 0.01 and abs((ids == 1).mean() - 0.7) < 0.01
    # Unweighted list: weights follow the dataset sizes (Megatron's rule).
    cfg.data.paths = [str(d / "ot"), str(d / "nt")]
    assert len(build_data(cfg, dp_rank=0, dp_size=1).train) >= 10_000


def test_user_errors(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size=1000.*tokenizer's vocabulary \(4096"):
        build_data(make_cfg(cache, **{"model.vocab_size": 1000}), dp_rank=0, dp_size=1)
    with pytest.raises(ConfigError, match=r"data.tokenizer.*no tokenizer"):
        build_data(make_cfg(cache, **{"data.tokenizer": str(tmp_path / "nope.json")}), dp_rank=0, dp_size=1)
    with pytest.raises(ConfigError, match=r"data.paths.*missing .*\.bin and .*\.idx"):
        build_data(make_cfg(cache, **{"data.paths": [str(tmp_path / "absent")]}), dp_rank=0, dp_size=1)
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"missing .*half\.idx"):
        build_data(make_cfg(cache, **{"data.paths": [str(tmp_path / "half")]}), dp_rank=0, dp_size=1)
    with pytest.raises(ConfigError, match="weight and prefix"):
        build_data(make_cfg(cache, **{"data.paths": [0.5, "a", 0.5]}), dp_rank=0, dp_size=1)


def test_sample_order_does_not_depend_on_the_budget(cache):
    """Megatron shuffles by the sample count it is asked for; one-epoch builds make the order budget-free."""
    # At seq 256 the corpus holds ~4k samples: 600 steps of 16 span more than 2 epochs, 60 steps less than one
    # (the case that reordered the data: 0 of 26 sampled positions agreed before the fix).
    over = {"model.seq_length": 256, "train.global_batch_size": 16}
    short = build_data(make_cfg(cache, **over, **{"train.steps": 60}), dp_rank=0, dp_size=1)
    long = build_data(make_cfg(cache, **over, **{"train.steps": 600}), dp_rank=0, dp_size=1)
    assert 600 * 16 > 2 * len(short.train) > 2 * 60 * 16
    assert short.fingerprint == long.fingerprint
    n = len(short.train)
    for i in [*range(0, 960, 37), n - 1, n, n + 5, 3 * n + 2]:  # also beyond the first epoch
        assert torch.equal(short.train[i]["tokens"], long.train[i]["tokens"]), i
    # A batch addressed by sample is the same whatever the global batch size around it.
    assert torch.equal(short.batch_at(96)[0]["tokens"], long.batch_at(96)[0]["tokens"])


def test_later_epochs_visit_every_sample_in_another_order(cache):
    data = build_data(make_cfg(cache, **{"model.seq_length": 1024}), dp_rank=0, dp_size=1)
    n = len(data.train)
    first = [int(data.train[i]["tokens"][0]) * 7 + int(data.train[i]["tokens"][5]) for i in range(n)]
    second = [int(data.train[n + i]["tokens"][0]) * 7 + int(data.train[n + i]["tokens"][5]) for i in range(n)]
    assert sorted(first) == sorted(second) and first != second


def test_mismatched_or_truncated_dataset_files_are_refused(cache, tmp_path):
    build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    (prefix,) = [p.with_suffix("") for p in cache.glob("datasets/kjv-*/kjv.idx")]
    bad = tmp_path / "bad"
    data = prefix.with_suffix(".bin").read_bytes()
    (tmp_path / "bad.idx").write_bytes(prefix.with_suffix(".idx").read_bytes())
    (tmp_path / "bad.bin").write_bytes(data[: len(data) // 2])  # truncated .bin
    with pytest.raises(
        UserError,
        match=r"data.paths: .*bad\.bin has \d+ bytes but bad\.idx describes .*llmtrain\.data\.prepare",
    ):
        build_data(make_cfg(cache, **{"data.paths": [str(bad)]}), dp_rank=0, dp_size=1)
    # the .idx of another dataset (fewer documents): the sizes disagree
    (tmp_path / "bad.bin").write_bytes(data)
    idx = prefix.with_suffix(".idx").read_bytes()
    with lzma.open(CORPUS_DIR / "kjv.jsonl.xz", "rt") as f:
        (tmp_path / "other.jsonl").write_text("".join(f.readlines()[:100]))
    opts = PrepareOptions([str(tmp_path / "other.jsonl")], "builtin", str(tmp_path / "other"), progress=False)
    prepare(opts, log=lambda _: None)
    (tmp_path / "bad.idx").write_bytes((tmp_path / "other.idx").read_bytes())
    with pytest.raises(UserError, match=r"bad\.bin has .* the \.idx of another dataset"):
        build_data(make_cfg(cache, **{"data.paths": [str(bad)]}), dp_rank=0, dp_size=1)
    # a manifest that describes other files
    (tmp_path / "bad.idx").write_bytes(idx)
    manifest = json.loads(prefix.with_suffix(".manifest.json").read_text())
    (tmp_path / "bad.manifest.json").write_text(json.dumps({**manifest, "documents": 7}))
    with pytest.raises(UserError, match=r"records 7 documents but .*1189"):
        build_data(make_cfg(cache, **{"data.paths": [str(bad)]}), dp_rank=0, dp_size=1)
    (tmp_path / "bad.idx").write_bytes(idx[:-8])
    with pytest.raises(UserError, match=r"bad\.idx has .* bytes but its header describes"):
        build_data(make_cfg(cache, **{"data.paths": [str(bad)]}), dp_rank=0, dp_size=1)


def test_mock_data(cache):
    data = build_data(make_cfg(cache, **{"data.mock": True}), dp_rank=0, dp_size=1)
    assert data.train_batch(3)[0]["tokens"].shape == (2, 64)


def test_builtin_prepared_once_matches_direct_tokenization(cache):
    build_data(make_cfg(cache), dp_rank=0, dp_size=1)
    (prefix,) = [p.with_suffix("") for p in cache.glob("datasets/kjv-*/kjv.idx")]
    manifest = json.loads(prefix.with_suffix(".manifest.json").read_text())
    assert manifest["documents"] == 1189 and manifest["malformed"] == dict.fromkeys(manifest["malformed"], 0)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CORPUS_DIR / "tokenizer.json"))
    with lzma.open(CORPUS_DIR / "kjv.jsonl.xz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    expect = np.concatenate([np.array([*e.ids, 0], dtype=np.uint16) for e in tok.encode_batch(texts[:50])])
    got = np.fromfile(str(prefix) + ".bin", dtype=np.uint16, count=expect.size)
    assert np.array_equal(expect, got)

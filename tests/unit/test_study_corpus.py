"""scripts/build_study_corpus.py: which files become documents, dedup, order, and a byte-identical rebuild."""

import gzip
import importlib.util
import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "build_study_corpus", REPO / "scripts" / "build_study_corpus.py"
)
bsc = importlib.util.module_from_spec(_spec)
sys.modules["build_study_corpus"] = bsc  # worker processes unpickle its functions by module name
_spec.loader.exec_module(bsc)

PROSE = "The quick brown fox jumps over the lazy dog, again and again, for the tokenizer's sake.\n" * 4
MIT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.\n" * 3


def make_tree(root: Path) -> dict[str, str]:
    """A small filesystem with one file per rule; returns path -> the status the builder must give it."""
    files = {
        "pkg/a.py": ("def f(x):\n    return x + 1\n\n" + PROSE, "kept"),
        "pkg/b.py": ("def   f(x):\n  return x + 1\n" + PROSE, "duplicate"),  # a.py up to whitespace
        "pkg/docs/guide.md": ("OTHER\n=====\n\n" + PROSE.replace("fox", "cat").upper(), "duplicate"),
        "pkg/LICENSE": ("Copyright (c) 2019 Alice\n\n" + MIT, "duplicate"),  # other/LICENSE.txt's holder
        "other/LICENSE.txt": ("Copyright 2023 Bob and contributors\n\n" + MIT, "kept"),
        "other/readme.rst": ("Other\n=====\n\n" + PROSE.replace("fox", "cat"), "kept"),
        "other/min.js": ("var a=1;" * 400 + "\n", "data_like"),
        "other/blob.py": ("x = 1\n\0\0\0" + PROSE, "binary"),
        "other/empty.txt": (" \n" * 120, "empty"),
    }
    out = {}
    for rel, (text, status) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        out[str(p)] = status
    latin = root / "other/latin1.txt"
    latin.write_bytes(("café " * 60).encode("latin-1"))
    out[str(latin)] = "non_utf8"
    man = root / "share/man/man1/tool.1.gz"
    man.parent.mkdir(parents=True)
    page = ".TH TOOL 1\n.SH NAME\ntool \\- does things\n" + " ".join(
        f"word{i * 7919 % 1000}" for i in range(80)
    )
    man.write_bytes(gzip.compress(page.encode()))
    out[str(man)] = "kept"
    (root / "pkg/image.png").write_bytes(b"\x89PNG" + b"\0" * 400)  # not a text extension: not listed
    os.symlink(root / "pkg/a.py", root / "other/link.py")  # symlinks are not followed
    return out


def build_args(root: Path, out: Path, **kw) -> Namespace:
    args = dict(
        out=str(out), roots=[str(root)], exclude=[], min_bytes=100, max_bytes=100_000, max_line=2000,
        vocab=300, sample=1.0, tokenizer=None, workers=1, keep_jsonl=True, stats_only=False,
    )  # fmt: skip
    args.update(kw)
    return Namespace(**args)


def read_sources(out: Path) -> dict[str, dict]:
    with gzip.open(out / "sources.jsonl.gz", "rt") as f:
        return {r["path"]: r for r in map(json.loads, f)}


def test_each_file_gets_the_status_its_rule_gives(tmp_path):
    expected = make_tree(tmp_path / "fs")
    summary = bsc.build(build_args(tmp_path / "fs", tmp_path / "out"))
    sources = read_sources(tmp_path / "out")
    assert {p: r["status"] for p, r in sources.items()} == expected
    # The first path in sorted order is kept, the later one points at it.
    assert sources[str(tmp_path / "fs/pkg/b.py")]["duplicate_of"] == str(tmp_path / "fs/pkg/a.py")
    assert sources[str(tmp_path / "fs/pkg/docs/guide.md")]["duplicate_of"] == str(
        tmp_path / "fs/other/readme.rst"
    )
    assert sources[str(tmp_path / "fs/pkg/LICENSE")]["duplicate_of"] == str(tmp_path / "fs/other/LICENSE.txt")
    kept = [r for r in sources.values() if r["status"] == "kept"]
    assert sorted(r["doc"] for r in kept) == list(range(4)) == list(range(summary["documents"]))
    manifest = json.loads((tmp_path / "out/study.manifest.json").read_text())
    assert manifest["documents"] == 4 and manifest["tokens"] == summary["tokens"] > 0


def test_documents_are_in_hash_order_not_path_order(tmp_path):
    """Megatron splits by document ranges: hash order makes the held-out documents random files."""
    root = tmp_path / "fs"
    for i in range(30):
        (root / f"pkg{i:02d}").mkdir(parents=True)
        (root / f"pkg{i:02d}/mod.py").write_text(f"# module {i}\n" + PROSE.replace("fox", f"fox{i}"))
    bsc.build(build_args(root, tmp_path / "out"))
    docs = [json.loads(line)["text"] for line in (tmp_path / "out/documents.jsonl").read_text().splitlines()]
    order = [int(d.split()[2]) for d in docs]
    assert sorted(order) == list(range(30)) and order != list(range(30))
    keys = [bsc.dedup_key("mod.py", d) for d in docs]
    assert keys == sorted(keys)


def test_rebuild_is_byte_identical_and_reports_up_to_date(tmp_path, capsys):
    make_tree(tmp_path / "fs")
    first = bsc.build(build_args(tmp_path / "fs", tmp_path / "a"))
    tok = tmp_path / "a/tokenizer/tokenizer.json"
    second = bsc.build(build_args(tmp_path / "fs", tmp_path / "b", tokenizer=str(tok.parent), workers=2))
    assert second["corpus_sha256"] == first["corpus_sha256"]
    for name in ("study.bin", "study.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    capsys.readouterr()
    again = bsc.build(build_args(tmp_path / "fs", tmp_path / "b"))
    assert "up to date" in capsys.readouterr().out and again == second


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = [PROSE.replace("fox", w) for w in ("cat", "owl", "elk", "yak")] * 5
    a = bsc.train_tokenizer(iter(texts), 400, tmp_path / "a") / "tokenizer.json"
    b = bsc.train_tokenizer(iter(texts), 400, tmp_path / "b") / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()


def test_licence_dedup_ignores_only_holder_and_year_lines():
    assert bsc.dedup_key("x/LICENSE", "Copyright 2001 A\n" + MIT) == bsc.dedup_key(
        "y/COPYING", "(c) B\n" + MIT
    )
    # outside licence files a copyright line is content, and a changed body is never a duplicate
    assert bsc.dedup_key("a.py", "# Copyright 2001 A\n" + MIT) != bsc.dedup_key(
        "b.py", "# Copyright B\n" + MIT
    )
    assert bsc.dedup_key("x/LICENSE", MIT) != bsc.dedup_key("y/LICENSE", MIT + "extra clause\n")


def test_bad_root_is_one_line_error(tmp_path, capsys):
    rc = bsc.main(["--out", str(tmp_path / "o"), "--roots", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and err.startswith("error: --roots")
        and "not a directory" in err
        and len(err.splitlines()) == 1
    )


@pytest.mark.parametrize("path", ["/usr/share/man/man1/ls.1.gz", "/usr/share/man/de/man8/x.8", "/a/README"])
def test_wanted_names(path):
    assert bsc.wanted(path)


@pytest.mark.parametrize(
    "path", ["/a/b.so", "/a/c.png", "/a/d.json", "/a/e.py.gz", "/usr/share/man/index.db"]
)
def test_unwanted_names(path):
    assert not bsc.wanted(path)

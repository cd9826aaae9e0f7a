"""`python -m llmtrain.data.prepare` end to end: byte identity with Megatron-LM's preprocess_data (golden
files), the same tokens from every input format, the malformed-input policy, one-line user errors, and
resume after kill -9."""

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from llmtrain.data.pipeline import PrepareOptions, prepare
from llmtrain.data.tokenizer import CORPUS_DIR
from llmtrain.errors import UserError
from tests.helpers import REPO, cli_env

GOLDEN = REPO / "tests" / "data" / "golden"
KJV = CORPUS_DIR / "kjv.jsonl.xz"


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory) -> Path:
    """The shipped tokenizer the way the golden files were made: a directory whose tokenizer_config.json
    names the EOS token (what Megatron's HuggingFaceTokenizer reads)."""
    d = tmp_path_factory.mktemp("tok")
    shutil.copy(CORPUS_DIR / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="module")
def golden_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (GOLDEN / "input.jsonl").read_text("utf-8").splitlines()]


def run_prepare(inputs, tokdir, out, logs=None, **kw) -> dict:
    kw.setdefault("progress", False)
    inputs = [str(p) for p in inputs] if isinstance(inputs, list) else [str(inputs)]
    return prepare(
        PrepareOptions(inputs, str(tokdir), str(out), **kw), log=(logs if logs is not None else []).append
    )


def files(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def run_module(*args, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llmtrain.data.prepare", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120, **kw)


@pytest.mark.parametrize(
    "options",
    [{}, {"fast": False}, {"workers": -1, "batch_mb": 0.002}],
    ids=["fast-path", "tokenizer-only", "threads-small-batches"],
)
def test_same_bytes_as_megatron_preprocess_data(tmp_path, tokdir, options):
    manifest = run_prepare(GOLDEN / "input.jsonl", tokdir, tmp_path / "ours", **options)
    golden = files(GOLDEN / "megatron_text_document")
    assert files(tmp_path / "ours") == golden
    assert manifest["documents"] == 23 and manifest["tokens"] == len(golden[0]) // 2
    assert manifest["tokenizer"]["eos"] == "<|endoftext|>"


def test_every_input_format_gives_the_same_tokens(tmp_path, tokdir, golden_texts):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = golden_texts
    inputs = {}
    inputs["jsonl.gz"] = tmp_path / "docs.jsonl.gz"
    with gzip.open(inputs["jsonl.gz"], "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    inputs["json"] = tmp_path / "docs.json"
    inputs["json"].write_text(json.dumps([{"text": t, "n": i} for i, t in enumerate(texts)]))
    inputs["parquet"] = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts}), inputs["parquet"], row_group_size=5)
    inputs["txt"] = tmp_path / "txt"  # a directory, one document per file, read in name order
    inputs["txt"].mkdir()
    for i, t in enumerate(texts):
        (inputs["txt"] / f"doc{i:03d}.txt").write_bytes(t.encode("utf-8"))
    inputs["hf"] = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(inputs["hf"]))

    golden = files(GOLDEN / "megatron_text_document")
    for name, path in inputs.items():
        run_prepare(path, tokdir, tmp_path / name, workers=1)
        assert files(tmp_path / name) == golden, name
    # Several inputs in one dataset: concatenated in the order given.
    both = run_prepare([inputs["parquet"], inputs["txt"]], tokdir, tmp_path / "both", workers=1)
    assert both["documents"] == 46 and [s["documents"] for s in both["sources"][:2]] == [23, 1]


MALFORMED_LINES = [
    b'{"text": "In the beginning."}',
    b'{"text": "broken',  # 2: invalid JSON
    b'{"title": "no text"}',  # 3: missing field
    b'{"text": 5}',  # 4: not a string
    b'{"text": "caf\xe9"}',  # 5: not UTF-8 (latin-1 byte)
    b'{"text": ""}',  # 6: empty document
    b"",  # 7: blank line, not a record
    b"[1, 2]",  # 8: not an object
    b'{"text": "lone \\ud800 surrogate"}',  # 9: valid JSON, but no UTF-8 encoding exists
    b'{"text": "And the earth was without form."}',
]
EXPECTED_COUNTS = {"invalid_json": 1, "missing_field": 3, "non_utf8": 2, "empty": 1}


def test_malformed_records_are_counted_and_skipped(tmp_path, tokdir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(MALFORMED_LINES) + b"\n")
    logs: list[str] = []
    manifest = run_prepare(bad, tokdir, tmp_path / "bad", logs, workers=1)
    assert manifest["malformed"] == EXPECTED_COUNTS
    assert manifest["documents"] == 2
    warnings = [m for m in logs if m.startswith("warning:")]
    for line, kind in [(2, "invalid json"), (3, "missing field"), (4, "missing field"), (5, "non utf8")]:
        assert any(f"{bad}:{line}: {kind}" in m for m in warnings), (line, kind, warnings)
    assert any(f"{bad}:6: empty" in m for m in warnings)
    assert any(f"{bad}:8: missing field" in m for m in warnings)
    assert any(f"{bad}:9: non utf8" in m for m in warnings)
    # The good documents are written exactly as if they had been alone.
    good = tmp_path / "good.jsonl"
    good.write_bytes(MALFORMED_LINES[0] + b"\n" + MALFORMED_LINES[-1] + b"\n")
    run_prepare(good, tokdir, tmp_path / "good", workers=1)
    assert files(tmp_path / "bad") == files(tmp_path / "good")


@pytest.mark.parametrize("line", [2, 3, 5, 6, 9])
def test_strict_makes_a_malformed_record_fatal(tmp_path, tokdir, line):
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(b"\n".join([MALFORMED_LINES[0]] * (line - 1) + [MALFORMED_LINES[line - 1]]) + b"\n")
    with pytest.raises(UserError, match=rf"{path}:{line}: .*strict=true") as e:
        run_prepare(path, tokdir, tmp_path / "out", strict=True, workers=1)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.idx").exists()


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, tokdir):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(MALFORMED_LINES) + b"\n")
    cases = {
        "no such file": [f"input={tmp_path}/missing.jsonl", f"tokenizer={tokdir}"],
        "no tokenizer at": [f"input={bad}", f"tokenizer={tmp_path}/nowhere"],
        f"{bad}:2: invalid json": [f"input={bad}", f"tokenizer={tokdir}", "strict=true"],
        # the training CLI's hint for a value Hydra cannot parse
        "eos=<|endoftext|>: cannot parse it (LexerNoViableAltException: eos=<|endoftext|>); "
        + "write it as \"eos='<|endoftext|>'\"": [f"input={bad}", f"tokenizer={tokdir}", "eos=<|endoftext|>"],
        f"input={bad},{bad}: a comma makes a sweep; give a list: input=[{bad},{bad}]": [
            f"input={bad},{bad}",
            f"tokenizer={tokdir}",
        ],
    }
    for expected, args in cases.items():
        proc = run_module(*args, f"output={tmp_path}/out", "progress=false")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_rerun_is_up_to_date_and_a_different_dataset_is_not_overwritten(tmp_path, tokdir):
    logs: list[str] = []
    run_prepare(GOLDEN / "input.jsonl", tokdir, tmp_path / "ds", logs, workers=1)
    run_prepare(GOLDEN / "input.jsonl", tokdir, tmp_path / "ds", logs, workers=1)
    assert "up to date" in logs[-1]
    with pytest.raises(UserError, match="a different dataset exists there; pass overwrite=true"):
        run_prepare(KJV, tokdir, tmp_path / "ds", workers=1)
    assert files(tmp_path / "ds") == files(GOLDEN / "megatron_text_document")


def test_kill_9_mid_run_then_rerun_gives_the_same_bytes(tmp_path, tokdir):
    # Small batches and commits: the run commits every ~20 KB of output, so a kill lands between commits.
    opts = ["batch_mb=0.02", "commit_mb=0.02", "workers=1", "progress=false"]
    out = tmp_path / "kjv"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmtrain.data.prepare",
            f"input={KJV}",
            f"tokenizer={tokdir}",
            f"output={out}",
            *opts,
        ],
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the tokenizer workers too
    )
    state = tmp_path / "kjv.partial" / "state.json"
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and proc.poll() is None and committed < 100:
        with contextlib.suppress(OSError, ValueError):  # not written yet, or being replaced
            committed = json.loads(state.read_text())["documents"]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert committed >= 100 and not (tmp_path / "kjv.idx").exists()

    logs: list[str] = []
    manifest = run_prepare(KJV, tokdir, out, logs, batch_mb=0.02, commit_mb=0.02, workers=1)
    assert any(m.startswith("resuming") for m in logs), logs
    assert not (tmp_path / "kjv.partial").exists()
    reference = run_prepare(KJV, tokdir, tmp_path / "reference", workers=-1)
    assert files(out) == files(tmp_path / "reference")
    assert manifest["documents"] == reference["documents"] == 1189
    assert manifest["malformed"] == reference["malformed"]
    with warnings.catch_warnings():  # megatron.core warns about missing GPU libraries
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(out))  # Megatron reads it back
    assert len(ds) == 1189 and int(ds[1188][-1]) == 0  # every document ends with EOS (id 0)
    assert sum(len(ds[i]) for i in range(len(ds))) == manifest["tokens"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_after_a_crash_counts_every_record_once(tmp_path, tokdir, golden_texts, monkeypatch, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmtrain.data import pipeline

    texts = [golden_texts[i % len(golden_texts)][: 50 + i] for i in range(300)]  # several per batch
    if fmt == "jsonl":
        lines = [json.dumps({"text": t}).encode() for t in texts]
        for i in range(0, len(lines), 9):  # malformed records and blank lines all along the file
            lines[i] = MALFORMED_LINES[1 + (i // 9) % 8]
        path = tmp_path / "in.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        values = [None if i % 11 == 0 else ("" if i % 13 == 0 else t) for i, t in enumerate(texts)]
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": values}), path, row_group_size=7)
    opts = {"batch_mb": 0.002, "commit_mb": 0.001, "workers": 1}
    reference = run_prepare(path, tokdir, tmp_path / "reference", **{**opts, "workers": 2})  # order kept

    real_write, calls = pipeline.IndexedWriter.write, []

    def crash_after_some_batches(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("simulated crash")
        real_write(self, tokens, lengths)

    monkeypatch.setattr(pipeline.IndexedWriter, "write", crash_after_some_batches)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_prepare(path, tokdir, tmp_path / "out", **opts)
    monkeypatch.undo()
    logs: list[str] = []
    # Another batch size: the resume position falls inside a block of the new run.
    manifest = run_prepare(path, tokdir, tmp_path / "out", logs, **{**opts, "batch_mb": 0.0031})
    assert any(m.startswith("resuming") for m in logs), logs
    assert files(tmp_path / "out") == files(tmp_path / "reference")
    assert manifest["malformed"] == reference["malformed"] and sum(manifest["malformed"].values()) > 10
    assert manifest["sources"] == reference["sources"]


@pytest.mark.parametrize("txt_mode", ["file", "line", "paragraph"])
@pytest.mark.parametrize("workers", [-1, 1])
def test_invalid_utf8_in_txt_is_counted_and_skipped(tmp_path, tokdir, txt_mode, workers):
    (tmp_path / "a.txt").write_bytes(b"a good file\n")
    (tmp_path / "b.txt").write_bytes(b"good first line\n\nbad \xff byte here\n\nlast good line\n")
    logs: list[str] = []
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    manifest = run_prepare(inputs, tokdir, tmp_path / "out", logs, txt_mode=txt_mode, workers=workers)
    assert manifest["malformed"]["non_utf8"] == 1
    assert manifest["documents"] == {"file": 1, "line": 3, "paragraph": 3}[txt_mode]
    assert any("non utf8" in line and "skipped" in line for line in logs)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


def test_input_with_only_invalid_utf8_says_there_is_nothing_to_write(tmp_path, tokdir):
    src = tmp_path / "in.txt"
    src.write_bytes(b"bad \xff byte\n")
    with pytest.raises(UserError, match=r"no document to write .*non_utf8 1"):
        run_prepare(src, tokdir, tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()


def _damaged(tmp_path, kind):
    good = (GOLDEN / "input.jsonl").read_bytes()
    if kind == "truncated.gz":
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(gzip.compress(good)[:200])
    elif kind == "fake.gz":
        path = tmp_path / "in.jsonl.gz"
        path.write_bytes(good)
    elif kind == "truncated.xz":
        import lzma

        path = tmp_path / "in.jsonl.xz"
        path.write_bytes(lzma.compress(good)[:200])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "in.parquet"
        texts = [json.loads(line)["text"] for line in good.decode().splitlines()]
        pq.write_table(pa.table({"text": texts}), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind", ["truncated.gz", "fake.gz", "truncated.xz", "truncated.parquet"])
def test_damaged_input_file_is_one_line_and_leaves_nothing_behind(tmp_path, tokdir, kind):
    path = _damaged(tmp_path, kind)
    proc = run_module(f"input={path}", f"tokenizer={tokdir}", f"output={tmp_path / 'out'}", "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert str(path) in err and "damaged or truncated file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .partial, .lock, .bin, .idx

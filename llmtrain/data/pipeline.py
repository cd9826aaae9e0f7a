"""prepare: documents -> tokens -> Megatron indexed dataset, streaming, resumable, atomic.

Work happens in `OUTPUT.partial/` (data.bin, lens.i32, state.json). Every `commit_mb` of output the
files are fsynced and state.json (input position, counts) is replaced atomically, so a killed run resumes
from its last commit. The finished dataset appears under its final name by renames, `.idx` last: a
`PREFIX.idx` next to a `PREFIX.bin` always means a complete dataset.
"""

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmtrain.data import encode as enc
from llmtrain.data.indexed import IndexedWriter, optimal_dtype, write_index
from llmtrain.data.progress import Progress
from llmtrain.data.sources import MALFORMED, Reader, Report, Source, expand_inputs
from llmtrain.data.tokenizer import eos_token, file_sha256, load_tokenizer, tokenizer_path, vocab_size
from llmtrain.errors import ConfigError, UserError
from llmtrain.fsio import writing

FORMAT_VERSION = 2  # of state.json positions: 2 counts JSON lines, blank ones included


@dataclass
class PrepareOptions:
    input: list[str]
    tokenizer: str
    output: str
    text_key: str = "text"
    txt_mode: str = "file"  # txt inputs: a document per file | line | paragraph
    eos: str | None = None  # EOD token; default: tokenizer_config.json's eos_token or a known name
    append_eos: bool = True
    strict: bool = False
    overwrite: bool = False
    workers: int = 0  # tokenizer processes; 0 = one per CPU core
    batch_mb: float = 1.0  # text per tokenizer call
    commit_mb: float = 64.0  # output written between two resumable commits
    progress: bool = True
    fast: bool = True  # chunked fast path where it is exact for the tokenizer (see encode.py)


def output_paths(output: str) -> dict[str, Path]:
    prefix = str(Path(output).expanduser()).removesuffix(".bin").removesuffix(".idx")
    work = Path(prefix + ".partial")
    return {
        "prefix": Path(prefix),
        "bin": Path(prefix + ".bin"),
        "idx": Path(prefix + ".idx"),
        "manifest": Path(prefix + ".manifest.json"),
        "lock": Path(prefix + ".lock"),
        "work": work,
        "work_bin": work / "data.bin",
        "work_lens": work / "lens.i32",
        "work_idx": work / "data.idx",
        "work_manifest": work / "manifest.json",
        "state": work / "state.json",
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fingerprint(opts: PrepareOptions, sources: list[Source], tok_sha: str, eos_id, dtype) -> str:
    key = {
        "version": FORMAT_VERSION,
        "sources": [s.identity() for s in sources],
        "tokenizer_sha256": tok_sha,
        "text_key": opts.text_key,
        "txt_mode": opts.txt_mode,
        "eos_id": eos_id,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _executor(opts: PrepareOptions, tok_file: str, eos_id, dtype) -> tuple[Executor, Callable, int]:
    """Tokenizer workers: processes with one Rust thread and one chunk cache each (JSON parsing and the
    Python half of encoding run in parallel too), or threads of this process when workers < 0 (inside
    a trainer, which must not fork), one Encoder per thread."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if opts.workers < 0:
        tok = load_tokenizer(tok_file)
        local = threading.local()

        def run(*job):
            if not hasattr(local, "encoder"):
                local.encoder = enc.Encoder(tok, eos_id, dtype, opts.fast)
            return enc.encode_job(local.encoder, *job)

        return ThreadPoolExecutor(cores), run, cores
    n = opts.workers or cores
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    ex = ProcessPoolExecutor(
        n, ctx, initializer=enc.init_worker, initargs=(tok_file, eos_id, str(dtype), opts.fast)
    )
    return ex, enc.encode_in_worker, n


def prepare(opts: PrepareOptions, log=print) -> dict:
    """Prepare `opts.input` into `opts.output` (.bin/.idx/.manifest.json); returns the manifest."""
    from filelock import FileLock

    paths = output_paths(opts.output)
    tok_file = tokenizer_path(opts.tokenizer, "tokenizer").resolve()
    tok = load_tokenizer(str(tok_file), "tokenizer")
    eos_name, eos_id = eos_token(str(tok_file), opts.eos, "tokenizer") if opts.append_eos else (None, None)
    dtype = optimal_dtype(vocab_size(tok))
    sources = expand_inputs(opts.input)
    if opts.txt_mode not in ("file", "line", "paragraph"):
        raise ConfigError("txt_mode", opts.txt_mode, "unknown", ["file", "line", "paragraph"])
    tok_sha = file_sha256(tok_file)
    fp = _fingerprint(opts, sources, tok_sha, eos_id, dtype)

    # A finished dataset appears whole (.idx last), so finding it up to date needs no lock: a read-only
    # copy of one is usable as it is.
    if (done := _up_to_date(paths, fp, opts, log)) is not None:
        return done
    # A refused write (read-only, no space) keeps the committed work in PREFIX.partial/: no .idx is published
    # before the end, so nothing looks complete, and the same command resumes once there is room.
    no_space = (
        "free space and rerun the same command (it resumes from its last commit), or choose another output="
    )
    with writing(paths["prefix"], "choose a writable output=", no_space):
        paths["prefix"].parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(paths["lock"])):
                return _prepare_locked(
                    opts, paths, sources, tok_file, tok_sha, eos_name, eos_id, dtype, fp, log
                )
        finally:
            # The lock file is only a rendezvous; finished outputs need no 0-byte PREFIX.lock beside them.
            # Where it could not be made (a read-only dir), removing it fails too: the error above counts.
            with contextlib.suppress(OSError):
                paths["lock"].unlink(missing_ok=True)


def _up_to_date(paths, fp, opts, log) -> dict | None:
    """The manifest of the finished dataset at the output if it is the one asked for (no overwrite)."""
    if opts.overwrite or not (paths["idx"].exists() and paths["bin"].exists()):
        return None
    done = _read_json(paths["manifest"])
    if not done or done.get("fingerprint") != fp:
        return None
    log(f"{paths['prefix']}: up to date ({done['documents']} documents, {done['tokens']} tokens)")
    return done


def _prepare_locked(opts, paths, sources, tok_file, tok_sha, eos_name, eos_id, dtype, fp, log) -> dict:
    if (done := _up_to_date(paths, fp, opts, log)) is not None:
        return done
    if paths["idx"].exists() and paths["bin"].exists() and not opts.overwrite:
        raise UserError(
            f"output={opts.output}: a different dataset exists there; pass overwrite=true or another output"
        )
    state = _read_json(paths["state"])
    if state and state.get("fingerprint") != fp:
        log(f"{paths['work']}: left by a run on other inputs/settings; starting from scratch")
        state = None
    if state and state.get("phase") == "finalizing":
        return _publish(paths, log)
    if state is None:
        shutil.rmtree(paths["work"], ignore_errors=True)
        paths["work"].mkdir(parents=True)
        state = {
            "fingerprint": fp,
            "phase": "writing",
            "source": 0,
            "records": 0,
            "bytes_in": 0,
            "documents": 0,
            "tokens": 0,
            "stats": {},
            "sources": {},
            "bin_bytes": 0,
        }
    elif state["documents"]:
        log(f"resuming {paths['prefix']} at {state['documents']} documents ({state['tokens']} tokens)")
    try:
        return _run(opts, paths, state, sources, str(tok_file), tok_sha, eos_name, eos_id, dtype, log)
    except UserError:
        # A damaged input or a strict-mode stop: the inputs must change, which voids the partial work, so
        # nothing half-written stays behind. (An interrupt keeps it: rerunning the command resumes.)
        shutil.rmtree(paths["work"], ignore_errors=True)
        raise


def _run(opts, paths, state, sources, tok_file, tok_sha, eos_name, eos_id, dtype, log) -> dict:
    report = Report(opts.strict, warn=log)
    writer = IndexedWriter(
        paths["work_bin"], paths["work_lens"], dtype, state["bin_bytes"], state["documents"]
    )
    stats = Counter(state["stats"])
    per_source: dict[str, dict] = state["sources"]
    progress = Progress(sum(s.size for s in sources), enabled=opts.progress, done_bytes=state["bytes_in"])
    t0 = time.perf_counter()
    new_tokens = 0
    commit_bytes = int(opts.commit_mb * (1 << 20))
    since_commit = 0
    ex, fn, n = _executor(opts, tok_file, eos_id, dtype)
    window = 2 * n + 1  # batches in flight: enough to keep every worker busy, bounded memory
    inflight: deque = deque()

    def drain_one():
        nonlocal new_tokens, since_commit
        batch, fut = inflight.popleft()
        tokens, lengths, problems = fut.result() if fut else (np.zeros(0, dtype), np.zeros(0, np.int32), [])
        path = sources[batch.source].path
        for problem in problems:  # found by the worker (JSON lines); raises in strict mode
            report(path, problem, batch.stats)
        writer.write(tokens, lengths)
        stats.update(batch.stats)
        state["documents"] += int(lengths.size)
        state["tokens"] += int(tokens.size)
        state["bytes_in"] += batch.nbytes
        new_tokens += int(tokens.size)
        since_commit += tokens.nbytes
        progress.update(batch.nbytes, state["documents"], state["tokens"])
        src = per_source.setdefault(str(batch.source), {"path": path, "documents": 0, "tokens": 0})
        src["documents"] += int(lengths.size)
        src["tokens"] += int(tokens.size)
        for k, v in batch.stats.items():
            src[k] = src.get(k, 0) + v
        state["source"], state["records"] = batch.source, batch.records
        if batch.sha256:  # the source is done: the next position is the start of the next one
            src["sha256"] = batch.sha256
            state["source"], state["records"] = batch.source + 1, 0
        if since_commit >= commit_bytes:
            _commit(writer, state, stats, per_source, paths)
            since_commit = 0

    batch_bytes = max(int(opts.batch_mb * (1 << 20)), 1)
    try:
        for si in range(state["source"], len(sources)):
            reader = Reader(sources[si], si, report, opts.text_key, opts.txt_mode)
            skip = state["records"] if si == state["source"] else 0
            for batch in reader.batches(skip, batch_bytes):
                job = batch.texts, batch.jsonl, batch.first_line, opts.text_key
                inflight.append((batch, ex.submit(fn, *job) if batch.texts or batch.jsonl else None))
                if len(inflight) >= window:
                    drain_one()
        while inflight:
            drain_one()
    finally:
        for _, fut in inflight:
            if fut:
                fut.cancel()
        ex.shutdown(wait=True, cancel_futures=True)
        progress.close()
    _commit(writer, state, stats, per_source, paths)
    writer.close()
    if state["documents"] == 0:
        shutil.rmtree(paths["work"], ignore_errors=True)
        bad = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if v) or "none"
        raise UserError(
            f"input={opts.input}: no document to write (malformed or empty records: {bad}); "
            f"check the input and text_key={opts.text_key!r}"
        )

    write_index(paths["work_idx"], paths["work_lens"], dtype)
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": "megatron-indexed-v1",
        "prefix": str(paths["prefix"]),
        "fingerprint": state["fingerprint"],
        "documents": state["documents"],
        "tokens": state["tokens"],
        "dtype": str(dtype),
        "tokenizer": {
            "path": tok_file,
            "sha256": tok_sha,
            "vocab_size": vocab_size(load_tokenizer(tok_file)),
            "eos": eos_name,
            "eos_id": eos_id,
        },
        "text_key": opts.text_key,
        "malformed": {k: stats.get(k, 0) for k in MALFORMED},
        "sources": [_source_summary(per_source[k]) for k in sorted(per_source, key=int)],
        "seconds": round(elapsed, 3),  # of the last (resumed) run
        "tokens_per_second": round(new_tokens / max(elapsed, 1e-9)),
    }
    _write_json(paths["work_manifest"], manifest)
    state["phase"] = "finalizing"
    _write_json(paths["state"], state)
    return _publish(paths, log)


def _source_summary(src: dict) -> dict:
    keys = ("path", "sha256", "documents", "tokens")
    return {**{k: src.get(k) for k in keys}, "malformed": {k: src.get(k, 0) for k in MALFORMED}}


def _commit(writer: IndexedWriter, state, stats, per_source, paths) -> None:
    writer.commit()
    state["bin_bytes"] = writer.num_bytes
    state["stats"] = dict(stats)
    state["sources"] = per_source
    _write_json(paths["state"], state)


def _publish(paths, log) -> dict:
    """Move the finished files to their final names; .idx last, so the dataset appears whole or not at all."""
    paths["idx"].unlink(missing_ok=True)  # an older dataset under this name stops being valid first
    for src, dst in (("work_bin", "bin"), ("work_manifest", "manifest"), ("work_idx", "idx")):
        if paths[src].exists():
            os.replace(paths[src], paths[dst])
    manifest = json.loads(paths["manifest"].read_text())
    shutil.rmtree(paths["work"], ignore_errors=True)
    log(
        f"wrote {paths['prefix']}.bin/.idx: {manifest['documents']} documents, {manifest['tokens']} tokens, "
        f"{manifest['tokens_per_second'] / 1e6:.2f}M tokens/s; malformed: "
        + (", ".join(f"{k} {v}" for k, v in manifest["malformed"].items() if v) or "none")
    )
    return manifest

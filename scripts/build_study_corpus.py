"""Build the GPU precision study's corpus from text already on the machine (issue 17).

    python scripts/build_study_corpus.py --out .study/corpus            # the default roots, all cores
    python scripts/build_study_corpus.py --out /tmp/c --stats-only      # count only: no tokenizer, no data

The GPU hosts have no network, so the corpus is the source code and documentation of what they hold: the
installed Python packages (every site-packages on sys.path, plus /opt/gpu-site), the standard library,
/usr/share/doc and the man pages. Nobody in this project wrote any of it (the llmtrain checkout is left
out). Steps, each deterministic (sorted walk, hashes, no clock, no random state):

1. walk the roots (symlinks not followed) and keep text files by name/extension and size;
2. read each (.gz decompressed), drop non-UTF-8, binary-looking and data-like files (very long lines);
3. drop exact duplicates (sha256 of the whitespace-collapsed text) and licence boilerplate (licence and
   copyright files compared without their lines that name a holder or a year): the first path in sorted
   order wins;
4. order the kept documents by their hash (a fixed shuffle): Megatron's split by document ranges
   (data.split) then holds out random whole files for validation instead of, say, all of one package;
5. train a byte-level BPE (GPT-2 pre-tokenizer, no normalizer: prepare's fast path is exact for it) on a
   hash-chosen sample of the documents, or reuse --tokenizer;
6. tokenize with llmtrain.data.prepare into OUT/study.{bin,idx,manifest.json}.

OUT/sources.jsonl.gz records every candidate file: path, sha256 of its bytes, size, and what happened to it
(kept with its document index, or the reason it was dropped and, for a duplicate, the path it duplicates).
OUT/summary.json holds the counts, the roots, the installed distributions and versions, and the tokenizer's
sha256, so a fresh host with the same packages rebuilds the same corpus (compare summary.json's
`corpus_sha256`). Running again over a finished OUT only re-checks it ("up to date").
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
TEXT_EXTENSIONS = {
    # code
    ".py", ".pyi", ".pyx", ".pxd", ".pxi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu",
    ".cuh", ".rs", ".go", ".java", ".js", ".ts", ".sh", ".f", ".f90", ".jl", ".r", ".lua", ".tcl",
    ".pl", ".pm", ".el", ".scm", ".m",
    # documentation and prose
    ".md", ".rst", ".txt", ".tex", ".texi", ".org", ".adoc", ".pod",
    # configuration with comments
    ".toml", ".cfg", ".ini", ".yaml", ".yml",
}  # fmt: skip
TEXT_NAMES = {
    "readme", "license", "licence", "copying", "notice", "authors", "changes", "changelog", "news",
    "history", "copyright", "thanks", "todo", "install", "metadata", "description",
}  # fmt: skip
LICENSE_NAMES = ("license", "licence", "copying", "copyright", "notice")
MAN_PAGE = re.compile(r"/man/(?:[^/]+/)?man[0-9n][^/]*/[^/]+\.[0-9n][a-z]*(?:\.gz)?$")
HOLDER_LINE = re.compile(r"copyright|\(c\)|©|\b(?:19|20)\d\d\b", re.IGNORECASE)


def default_roots() -> list[str]:
    """Where a host keeps text nobody here wrote: /usr (packages' docs, man pages, headers, the system
    Python), /opt (e.g. /opt/gpu-site: TE, Megatron-Core, Hydra), and every Python's stdlib and
    site-packages on sys.path (wherever the interpreter lives)."""
    candidates = ["/usr", "/opt", sysconfig.get_paths()["stdlib"]]
    candidates += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    roots: list[str] = []
    for c in sorted({os.path.realpath(c) for c in candidates if os.path.isdir(c)}):
        if not any(c.startswith(r + os.sep) for r in roots):  # nested in a root already listed
            roots.append(c)
    return roots


def wanted(path: str) -> bool:
    base = os.path.basename(path).lower()
    stem = base.removesuffix(".gz")
    if MAN_PAGE.search(path):
        return True
    ext = os.path.splitext(stem)[1]
    if ext in TEXT_EXTENSIONS:
        return not base.endswith(".gz") or ext in (".txt", ".md", ".rst")
    return stem.split(".")[0] in TEXT_NAMES


def list_files(roots: list[str], min_bytes: int, max_bytes: int, exclude: list[str]) -> list[str]:
    """Every wanted regular file under the roots, sorted, each real path once; symlinks not followed."""
    exclude = [os.path.realpath(e) + os.sep for e in exclude]
    found = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            if any((dirpath + os.sep).startswith(e) for e in exclude):
                dirnames[:] = []
                continue
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not wanted(path):
                    continue
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue
                if min_bytes <= size <= max_bytes:
                    found.add(os.path.realpath(path))
    return sorted(found)


def is_license(path: str) -> bool:
    return os.path.basename(path).lower().startswith(LICENSE_NAMES)


def dedup_key(path: str, text: str) -> str:
    """Whitespace- and case-insensitive content hash; licence files also ignore holder/year lines, so
    the thousands of MIT/BSD/Apache copies that differ only in their copyright line count once."""
    lines = text.lower().split("\n")
    if is_license(path):
        lines = [ln for ln in lines if not HOLDER_LINE.search(ln)]
    body = " ".join(" ".join(lines).split())
    return hashlib.sha256(body.encode()).hexdigest()


def read_file(path: str, max_line: int) -> dict:
    """One candidate: its hashes and text, or the reason it is dropped."""
    try:
        raw = Path(path).read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        data = gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return {"path": path, "status": "unreadable", "error": type(e).__name__}
    rec = {"path": path, "sha256": sha, "bytes": len(raw)}
    if b"\0" in data:
        return {**rec, "status": "binary"}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {**rec, "status": "non_utf8"}
    text = text.replace("\r\n", "\n")
    if not text.strip():
        return {**rec, "status": "empty"}
    lines = text.split("\n")
    if max(len(ln) for ln in lines) > max_line or len(text) / len(lines) > max_line / 10:
        return {**rec, "status": "data_like"}  # minified code, tables, embedded blobs
    return {**rec, "status": "ok", "key": dedup_key(path, text), "text": text}


def _read_chunk(args: tuple[list[str], int]) -> list[dict]:
    paths, max_line = args
    return [read_file(p, max_line) for p in paths]


def read_all(paths: list[str], workers: int, max_line: int) -> list[dict]:
    chunks = [(paths[i : i + 256], max_line) for i in range(0, len(paths), 256)]
    if workers <= 1:
        return [r for c in chunks for r in _read_chunk(c)]
    with ProcessPoolExecutor(workers) as pool:
        return [r for rs in pool.map(_read_chunk, chunks) for r in rs]


def dedup_and_order(records: list[dict]) -> list[dict]:
    """Mark duplicates (first path in sorted order wins); number the kept ones in hash order."""
    first: dict[str, str] = {}
    for rec in records:  # records are in sorted path order
        if rec["status"] != "ok":
            continue
        if rec["key"] in first:
            rec["status"], rec["duplicate_of"] = "duplicate", first[rec["key"]]
        else:
            first[rec["key"]] = rec["path"]
    kept = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (r["key"], r["path"]))
    for i, rec in enumerate(kept):
        rec["status"], rec["doc"] = "kept", i
    return kept


def in_sample(rec: dict, fraction: float) -> bool:
    return int(rec["key"][:8], 16) < fraction * 16**8


def train_tokenizer(texts, vocab: int, out_dir: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}) + "\n")
    return out_dir


def distributions() -> list[str]:
    from importlib import metadata

    return sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]}
    )


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_sources(path: Path, records: list[dict]) -> None:
    fields = ("path", "sha256", "bytes", "status", "doc", "duplicate_of", "error")
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for rec in records:
            f.write(json.dumps({k: rec[k] for k in fields if k in rec}) + "\n")


def build(args) -> dict:
    out = Path(args.out)
    summary_path = out / "summary.json"
    if summary_path.is_file() and not args.stats_only and Path(out / "study.idx").is_file():
        print(f"{out}: up to date (summary.json and study.idx exist; delete {out} to rebuild)")
        return json.loads(summary_path.read_text())
    t0 = time.time()
    roots = args.roots or default_roots()
    if not roots:
        raise UserError("--roots: none of the default roots exist; pass --roots DIR [DIR ...]")
    for r in roots:
        if not os.path.isdir(r):
            raise UserError(f"--roots {r}: not a directory")
    paths = list_files(roots, args.min_bytes, args.max_bytes, [str(REPO), str(out), *args.exclude])
    print(f"{len(paths)} candidate files under {len(roots)} roots ({time.time() - t0:.0f} s)", flush=True)
    records = read_all(paths, args.workers, args.max_line)
    kept = dedup_and_order(records)
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    chars = sum(len(r["text"]) for r in kept)
    text_bytes = sum(len(r["text"].encode()) for r in kept)
    print(
        f"kept {len(kept)} documents, {text_bytes / 1e6:.1f} MB; dropped {counts} ({time.time() - t0:.0f} s)",
        flush=True,
    )
    summary = {
        "roots": roots,
        "excluded": [str(REPO), *args.exclude],
        "settings": {k: getattr(args, k) for k in ("min_bytes", "max_bytes", "max_line", "vocab", "sample")},
        "candidates": len(records),
        "status_counts": counts,  # kept, duplicate, binary, non_utf8, data_like, empty, unreadable
        "documents": len(kept),
        "chars": chars,
        "text_bytes": text_bytes,
        "python": sys.version.split()[0],
    }
    out.mkdir(parents=True, exist_ok=True)
    if not kept:
        raise UserError(f"no documents under {', '.join(roots)}; pass --roots with text files")
    sample = [r for r in kept if in_sample(r, args.sample)]
    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    else:
        t1 = time.time()
        tok_dir = train_tokenizer((r["text"] for r in sample), args.vocab, out / "tokenizer")
        mb = sum(len(r["text"]) for r in sample) / 1e6
        print(f"tokenizer: {args.vocab} BPE on {len(sample)} docs, {mb:.1f} MB ({time.time() - t1:.0f} s)")
    import tokenizers

    from llmtrain.data.tokenizer import load_tokenizer, tokenizer_path

    tok_file = tokenizer_path(str(tok_dir), "--tokenizer")
    summary["tokenizer"] = {
        "path": str(tok_file),
        "sha256": sha256_file(tok_file),
        "tokenizers": tokenizers.__version__,
        "sample_docs": len(sample),
    }
    if args.stats_only:
        tok = load_tokenizer(str(tok_dir), "--tokenizer")
        probe = [r["text"] for r in kept if not in_sample(r, args.sample)][:: max(1, len(kept) // 2000)]
        probe_chars = sum(len(t) for t in probe)
        probe_tokens = sum(len(e.ids) for e in tok.encode_batch(probe))
        summary["estimated_tokens"] = int(chars * probe_tokens / probe_chars) + len(kept)
        summary["probe"] = {"docs": len(probe), "chars": probe_chars, "tokens": probe_tokens}
        print(
            f"estimate: {probe_chars / probe_tokens:.2f} chars/token on {len(probe)} held-out docs -> "
            f"{summary['estimated_tokens'] / 1e6:.1f}M tokens ({time.time() - t0:.0f} s)"
        )
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        return summary
    jsonl = out / "documents.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for rec in kept:
            f.write(json.dumps({"text": rec["text"]}, ensure_ascii=False) + "\n")
    write_sources(out / "sources.jsonl.gz", records)
    summary["corpus_sha256"] = sha256_file(jsonl)
    summary["distributions"] = distributions()
    from llmtrain.data.pipeline import PrepareOptions, prepare

    manifest = prepare(
        PrepareOptions(
            input=[str(jsonl)], tokenizer=str(tok_dir), output=str(out / "study"), workers=args.workers
        ),
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    summary["tokens"] = manifest["tokens"]
    summary["seconds"] = round(time.time() - t0, 1)
    if not args.keep_jsonl:
        jsonl.unlink()
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"{out}/study: {manifest['documents']} documents, {manifest['tokens'] / 1e6:.1f}M tokens ({summary['seconds']} s)"
    )
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".study/corpus", help="output directory")
    ap.add_argument("--roots", nargs="*", help="directories to read (default: see the module docstring)")
    ap.add_argument("--exclude", nargs="*", default=[], help="directories to leave out")
    ap.add_argument("--min-bytes", type=int, default=200)
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="larger files are mostly generated")
    ap.add_argument("--max-line", type=int, default=2000, help="a longer line marks a file data-like")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--sample", type=float, default=0.1, help="share of documents the BPE is trained on")
    ap.add_argument("--tokenizer", help="use this tokenizer instead of training one")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep-jsonl", action="store_true", help="keep OUT/documents.jsonl (the text)")
    ap.add_argument("--stats-only", action="store_true", help="count and estimate tokens; write no dataset")
    args = ap.parse_args(argv)
    try:
        build(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

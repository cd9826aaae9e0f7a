"""Input side of prepare: find the input files and cut them into batches of documents.

Formats: jsonl / json (lines or one array), parquet, txt (a document per file, line or paragraph), each
optionally compressed (.gz, .xz, .bz2), globs and directories of those, and Hugging Face `datasets`
datasets (a `save_to_disk` directory, or `hf:NAME[:SPLIT]` when the hub is reachable).

JSON lines travel to the tokenizer workers as raw blocks of whole lines and are parsed there
(`parse_jsonl`), so parsing runs in parallel; the other formats are read here. A malformed record is
counted under one of MALFORMED and skipped with a warning, or stops the run in strict mode (`Report`).
Positions count records (for JSON lines: lines, blank ones included), and every record, good or bad,
advances it, so a resumed run skips exactly what was already consumed.
"""

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.errors import ConfigError, UserError

MALFORMED = ("invalid_json", "missing_field", "non_utf8", "empty")
COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
INPUT_HELP = "a jsonl/json/parquet/txt file (.gz/.xz/.bz2 too), a glob, a directory, or hf:NAME[:SPLIT]"


@dataclass
class Source:
    """One input: a file (`path`, `fmt`) or a Hugging Face dataset (`fmt` == "hf")."""

    path: str
    fmt: str
    size: int = 0

    def identity(self) -> dict:
        """Cheap identity (for resume checks); the content hash goes into the manifest."""
        if self.fmt == "hf" and not Path(self.path).exists():
            return {"path": self.path}
        p = Path(self.path)
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def expand_inputs(inputs) -> list[Source]:
    """Files, globs, directories (searched recursively) and hf: names -> sorted, deduplicated sources."""
    specs = [inputs] if isinstance(inputs, str | Path) else list(inputs or [])
    if not specs:
        raise ConfigError("input", inputs, "no input given", INPUT_HELP)
    out: list[Source] = []
    for spec in map(str, specs):
        if spec.startswith("hf:"):
            out.append(Source(spec[3:], "hf"))
            continue
        path = Path(spec).expanduser()
        if _is_hf_dir(path):
            out.append(Source(str(path), "hf", sum(f.stat().st_size for f in path.rglob("*.arrow"))))
            continue
        if glob.has_magic(spec):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
        elif path.is_file():
            found = [path]
        else:
            raise ConfigError("input", spec, "no such file or directory", INPUT_HELP)
        files = [p for p in found if p.is_file() and _format_of(p)]
        if not files:
            raise ConfigError("input", spec, "matches no jsonl/json/parquet/txt file", INPUT_HELP)
        out += [Source(str(p), _format_of(p), p.stat().st_size) for p in files]
    seen: set[str] = set()
    return [s for s in out if not (s.path in seen or seen.add(s.path))]


@contextmanager
def damaged_file_is_one_line(path: str):
    """A truncated or fake .gz/.xz/.bz2, or a damaged parquet file: one line naming it (exit 2)."""
    try:
        yield
    except (EOFError, OSError, lzma.LZMAError, zlib.error, ValueError) as e:
        if isinstance(e, UnicodeDecodeError):
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"input {path}: damaged or truncated file ({type(e).__name__}: {detail}); "
            "replace it (re-download or recreate it) or leave it out of the input"
        ) from None


def _open_binary(path: str):
    opener = COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb")


# ----------------------------------------------------------------------------------------------------
# Record checks (shared by the readers here and the JSON-lines parser in the workers)

Problem = tuple[str, str, str]  # (kind from MALFORMED, where, detail)


def check_text(value, key: str, where: str, problems: list[Problem]) -> str | None:
    """`value` if it is a usable document text, else None with the reason appended to `problems`."""
    if not isinstance(value, str):
        problems.append(("missing_field", where, f"no string field {key!r}"))
        return None
    if not value:
        problems.append(("empty", where, "empty document"))
        return None
    return value


def parse_jsonl(data: bytes, first_line: int, key: str) -> tuple[list[str], list[int], list[Problem]]:
    """Texts of a block of whole JSON lines (line `first_line` first), their line numbers, and the
    malformed records in it."""
    problems: list[Problem] = []
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = None  # find the culprit lines below
    if lines is None:
        lines = []
        for n, raw in enumerate(data.split(b"\n"), first_line):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.append(("non_utf8", str(n), str(e)))
                lines.append("")  # reported; skipped below as blank
    texts: list[str] = []
    numbers: list[int] = []
    loads = json.loads
    for n, line in enumerate(lines, first_line):
        if not line.strip(" \t\r"):
            continue  # blank lines are not records
        try:
            obj = loads(line)
        except ValueError as e:
            problems.append(("invalid_json", str(n), str(e)))
            continue
        if not isinstance(obj, dict):
            problems.append(("missing_field", str(n), "not a JSON object"))
            continue
        text = check_text(obj.get(key), key, str(n), problems)
        # A \ud800-\udfff escape can leave a lone surrogate: valid JSON, but no UTF-8 (or tokens) for it.
        if text is not None and ("\\ud" in line or "\\uD" in line) and not encodable(text):
            problems.append(("non_utf8", str(n), "lone surrogate escape (\\ud800-\\udfff)"))
            text = None
        if text is not None:
            texts.append(text)
            numbers.append(n)
    problems.sort(key=lambda p: int(p[1]))  # in line order, whichever check found them
    return texts, numbers, problems


def encodable(text: str) -> bool:
    """False for text holding lone surrogates (from JSON \\ud800 escapes): it has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Report:
    """Counts, warns about (the first `max_warnings` per source) or, in strict mode, stops at malformed
    records."""

    strict: bool = False
    warn: Callable[[str], None] = print
    max_warnings: int = 10
    _warned: Counter = field(default_factory=Counter)

    def __call__(self, path: str, problem: Problem, stats: Counter) -> None:
        kind, where, detail = problem
        stats[kind] += 1
        msg = f"{path}:{where}: {kind.replace('_', ' ')}: {detail}"
        if self.strict:
            raise UserError(f"{msg} (strict=true; fix the input or run with strict=false to skip it)")
        n = self._warned[path]
        if n < self.max_warnings:
            self.warn(f"warning: {msg}; skipped")
        elif n == self.max_warnings:
            self.warn(f"warning: {path}: more malformed records; their counts go to the manifest")
        self._warned[path] = n + 1


# ----------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Documents for one tokenizer call: parsed `texts`, or a block of raw JSON lines (`jsonl`, parsed by
    the worker). Writing it moves the position of `source` to `records`."""

    source: int
    records: int
    nbytes: int
    texts: list[str] | None = None
    jsonl: bytes | None = None
    first_line: int = 1
    stats: Counter = field(default_factory=Counter)  # malformed records found while reading this batch
    sha256: str | None = None  # on the last batch of a source: the hash of all its bytes


@dataclass
class Reader:
    """Cuts one source into batches of about `batch_bytes` of text, from record `skip` on."""

    source: Source
    index: int
    report: Report
    text_key: str = "text"
    txt_mode: str = "file"  # file | line | paragraph

    def __post_init__(self):
        self._hash = hashlib.sha256()

    def batches(self, skip: int, batch_bytes: int) -> Iterator[Batch]:
        fmt = self.source.fmt
        if fmt == "jsonl" or (fmt == "json" and not self._is_json_array()):
            yield from self._jsonl_batches(skip, batch_bytes)
        else:
            yield from self._text_batches(skip, batch_bytes)

    def _is_json_array(self) -> bool:
        with _open_binary(self.source.path) as f:
            return f.read(1 << 16).lstrip().startswith(b"[")

    def _read(self, size: int) -> Iterator[bytes]:
        with damaged_file_is_one_line(self.source.path), _open_binary(self.source.path) as f:
            while block := f.read(size):
                self._hash.update(block)
                yield block

    def _jsonl_batches(self, skip: int, batch_bytes: int) -> Iterator[Batch]:
        """Blocks of whole lines; the first `skip` lines are read (for the hash) but not sent."""
        line, carry, block = 0, b"", b""
        for data in self._read(batch_bytes):
            buf = carry + data if carry else data
            cut = buf.rfind(b"\n") + 1
            if not cut:
                carry = buf  # a line longer than a batch: read on
                continue
            block, carry = buf[:cut], buf[cut:]
            n = block.count(b"\n")
            if line + n <= skip:
                line += n
                continue
            if line < skip:  # resume inside this block
                for _ in range(skip - line):
                    block = block[block.index(b"\n") + 1 :]
                n, line = block.count(b"\n"), skip
            yield Batch(self.index, line + n, len(block), jsonl=block, first_line=line + 1)
            line += n
        if carry and line >= skip:  # a last line without a newline
            yield Batch(self.index, line + 1, len(carry), jsonl=carry, first_line=line + 1)
            line += 1
        # A batch boundary at every source end keeps the position (source, records) simple.
        yield Batch(self.index, max(line, skip), 0, texts=[], sha256=self._hash.hexdigest())

    def _text_batches(self, skip: int, batch_bytes: int) -> Iterator[Batch]:
        records = {"json": self._json, "parquet": self._parquet, "txt": self._txt, "hf": self._hf}
        texts: list[str] = []
        stats: Counter = Counter()
        nbytes, n = 0, 0
        for n, (value, where) in enumerate(records[self.source.fmt](), 1):
            if n <= skip:
                continue
            problems: list[Problem] = []
            if isinstance(value, tuple):  # a problem found while reading
                problems.append(value)
                value = None
            else:
                value = check_text(value, self.text_key, where, problems)
            for p in problems:
                self.report(self.source.path, p, stats)
            if value is not None:
                texts.append(value)
                nbytes += len(value)
            if nbytes >= batch_bytes:
                yield Batch(self.index, n, nbytes, texts=texts, stats=stats)
                texts, stats, nbytes = [], Counter(), 0
        yield Batch(self.index, max(n, skip), nbytes, texts=texts, stats=stats, sha256=self._hash.hexdigest())

    # Record generators: (value, where) per record; value is a text candidate or a Problem tuple.

    def _json(self) -> Iterator[tuple]:
        raw = b"".join(self._read(1 << 22))  # a JSON array is parsed whole; prefer jsonl for large inputs
        try:
            items = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            kind = "non_utf8" if isinstance(e, UnicodeDecodeError) else "invalid_json"
            yield (kind, "0", f"whole file unreadable: {e}"), "0"
            return
        for i, obj in enumerate(items):
            where = f"item {i}"
            if not isinstance(obj, dict):
                yield ("missing_field", where, "not a JSON object"), where
            elif isinstance(text := obj.get(self.text_key), str) and text and not encodable(text):
                yield ("non_utf8", where, "lone surrogate escape (\\ud800-\\udfff)"), where
            else:
                yield obj.get(self.text_key), where

    def _parquet(self) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        for _ in self._read(1 << 22):  # the hash of the file
            pass
        with damaged_file_is_one_line(self.source.path):
            pf = pq.ParquetFile(self.source.path)
        if self.text_key not in pf.schema_arrow.names:
            raise ConfigError(
                "text_key", self.text_key, f"not a column of {self.source.path}", pf.schema_arrow.names
            )
        row = 0
        batches = pf.iter_batches(batch_size=4096, columns=[self.text_key])
        while True:
            with damaged_file_is_one_line(self.source.path):
                batch = next(batches, None)
            if batch is None:
                return
            for value in batch.column(0).to_pylist():
                yield value, f"row {row}"
                row += 1

    def _txt(self) -> Iterator[tuple]:
        raw = b"".join(self._read(1 << 22))
        if self.txt_mode == "line":
            docs = [d.removesuffix(b"\r") for d in raw.split(b"\n")]
            if docs and not docs[-1]:
                docs.pop()  # the newline ending the last line does not start another one
        elif self.txt_mode == "paragraph":
            docs = [d.strip(b"\n") for d in raw.replace(b"\r\n", b"\n").split(b"\n\n")]
            docs = [d for d in docs if d.strip()]
        else:
            docs = [raw]
        for n, doc in enumerate(docs, 1):
            try:
                yield doc.decode("utf-8"), str(n)
            except UnicodeDecodeError as e:
                yield ("non_utf8", str(n), str(e)), str(n)

    def _hf(self) -> Iterator[tuple]:
        ds = load_hf_dataset(self.source.path)
        if self.text_key not in ds.column_names:
            raise ConfigError(
                "text_key", self.text_key, f"not a column of {self.source.path}", ds.column_names
            )
        self._hash.update(getattr(ds, "_fingerprint", self.source.path).encode())
        row = 0
        for batch in ds.select_columns([self.text_key]).iter(batch_size=4096):
            for value in batch[self.text_key]:
                yield value, f"row {row}"
                row += 1


def load_hf_dataset(spec: str):
    """A `datasets` dataset: a save_to_disk directory, or NAME[:SPLIT] from the hub (default split train)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "reading a Hugging Face dataset needs `datasets`: pip install 'llmtrain[data]'"
        ) from None
    path = Path(spec).expanduser()
    if path.exists():
        ds = datasets.load_from_disk(str(path))
        split = "train"
    else:
        name, _, split = spec.partition(":")
        split = split or "train"
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise UserError(
                f"input=hf:{spec}: cannot load the dataset ({e}); save it with save_to_disk and pass the directory"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError("input", spec, f"dataset has no split {split!r}", list(ds))
        ds = ds[split]
    return ds

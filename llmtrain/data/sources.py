"""Input side of prepare: find the input files and stream their documents as text.

Formats: jsonl / json (lines or one array), parquet, txt (a document per file, line or paragraph), each
optionally compressed (.gz, .xz, .bz2), globs and directories of those, and Hugging Face `datasets`
datasets (a `save_to_disk` directory, or `hf:NAME[:SPLIT]` when the hub is reachable).

Malformed records are counted in `Batch.stats` under MALFORMED keys and skipped with a warning, or
raise UserError in strict mode. Every record (good or bad) advances the position, so a resumed run
skips exactly what was already consumed.
"""

import bz2
import glob
import gzip
import hashlib
import json
import lzma
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.errors import ConfigError, UserError

MALFORMED = ("invalid_json", "missing_field", "non_utf8", "empty")
COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
READ_BLOCK = 1 << 22


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
        raise ConfigError("input", inputs, "no input given", "a file, glob, directory or hf:NAME")
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
            raise ConfigError("input", spec, "no such file or directory", "check the path")
        files = [p for p in found if p.is_file() and _format_of(p)]
        if not files:
            raise ConfigError("input", spec, "matches no jsonl/json/parquet/txt file", list(FORMATS))
        out += [Source(str(p), _format_of(p), p.stat().st_size) for p in files]
    seen: set[str] = set()
    return [s for s in out if not (s.path in seen or seen.add(s.path))]


def _open_binary(path: str):
    opener = COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb")


@dataclass
class Reader:
    """Streams the texts of one source; `stats` and `sha256` fill in as it goes."""

    source: Source
    text_key: str = "text"
    txt_mode: str = "file"  # file | line | paragraph
    strict: bool = False
    warn: Callable[[str], None] = print
    stats: Counter = field(default_factory=Counter)
    max_warnings: int = 10

    def __post_init__(self):
        self._hash = hashlib.sha256()
        self._warned = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _bad(self, kind: str, where: str, detail: str) -> None:
        self.stats[kind] += 1
        msg = f"{self.source.path}:{where}: {kind.replace('_', ' ')}: {detail}"
        if self.strict:
            raise UserError(f"{msg} (strict=true; fix the input or run with strict=false to skip it)")
        if self._warned < self.max_warnings:
            self.warn(f"warning: {msg}; skipped")
        elif self._warned == self.max_warnings:
            self.warn(f"warning: {self.source.path}: more malformed records; counts go to the manifest")
        self._warned += 1

    def _text(self, value, where: str) -> str | None:
        if not isinstance(value, str):
            self._bad("missing_field", where, f"no string field {self.text_key!r}")
            return None
        if not value:
            self._bad("empty", where, "empty document")
            return None
        return value

    def records(self, skip: int = 0) -> Iterator[str | None]:
        """Yield one item per record: its text, or None for a skipped (malformed) one."""
        fmt = self.source.fmt
        gen = {
            "jsonl": self._jsonl,
            "json": self._json,
            "parquet": self._parquet,
            "txt": self._txt,
            "hf": self._hf,
        }[fmt]
        for i, text in enumerate(gen()):
            if i >= skip:
                yield text

    def _blocks(self) -> Iterator[bytes]:
        with _open_binary(self.source.path) as f:
            while block := f.read(READ_BLOCK):
                self._hash.update(block)
                yield block

    def _lines(self) -> Iterator[bytes]:
        """Lines split on b'\\n' from large blocks: far fewer syscalls and objects than readline."""
        carry = b""
        for block in self._blocks():
            lines = (carry + block).split(b"\n") if carry else block.split(b"\n")
            carry = lines.pop()
            yield from lines
        if carry:
            yield carry

    def _jsonl(self, lines: Iterator[bytes] | None = None) -> Iterator[str | None]:
        key = self.text_key
        lineno = 0
        for line in lines if lines is not None else self._lines():
            lineno += 1
            if not line.strip():
                continue  # blank lines are not records
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                self._bad("non_utf8", str(lineno), str(e))
                yield None
                continue
            except ValueError as e:
                self._bad("invalid_json", str(lineno), str(e))
                yield None
                continue
            if not isinstance(obj, dict):
                self._bad("missing_field", str(lineno), "not a JSON object")
                yield None
                continue
            yield self._text(obj.get(key), str(lineno))

    def _json(self) -> Iterator[str | None]:
        lines = self._lines()
        first = next(lines, b"")
        if not first.lstrip().startswith(b"["):
            yield from self._jsonl(_chain_first(first, lines))
            return
        # A JSON array must be parsed whole; prefer jsonl for large inputs.
        raw = b"\n".join(_chain_first(first, lines))
        try:
            items = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            kind = "non_utf8" if isinstance(e, UnicodeDecodeError) else "invalid_json"
            self._bad(kind, "0", f"whole file unreadable: {e}")
            yield None
            return
        for i, obj in enumerate(items):
            if isinstance(obj, dict):
                yield self._text(obj.get(self.text_key), f"item {i}")
            else:
                self._bad("missing_field", f"item {i}", "not a JSON object")
                yield None

    def _parquet(self) -> Iterator[str | None]:
        import pyarrow.parquet as pq

        self._hash_file()
        pf = pq.ParquetFile(self.source.path)
        if self.text_key not in pf.schema_arrow.names:
            raise ConfigError(
                "text_key", self.text_key, f"not a column of {self.source.path}", pf.schema_arrow.names
            )
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=[self.text_key]):
            for value in batch.column(0).to_pylist():
                yield self._text(value, f"row {row}")
                row += 1

    def _hash_file(self) -> None:
        for _ in self._blocks():
            pass

    def _txt(self) -> Iterator[str | None]:
        if self.txt_mode == "line":
            lines = self._lines()
        else:
            raw = b"".join(self._blocks())
            lines = [raw] if self.txt_mode == "file" else raw.replace(b"\r\n", b"\n").split(b"\n\n")
        for n, raw_doc in enumerate(lines, 1):
            if self.txt_mode == "line":
                raw_doc = raw_doc.removesuffix(b"\r")
            elif self.txt_mode == "paragraph":
                raw_doc = raw_doc.strip(b"\n")
                if not raw_doc.strip():
                    continue
            try:
                text = raw_doc.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad("non_utf8", str(n), str(e))
                yield None
                continue
            yield self._text(text, str(n))

    def _hf(self) -> Iterator[str | None]:
        ds = load_hf_dataset(self.source.path)
        if self.text_key not in ds.column_names:
            raise ConfigError(
                "text_key", self.text_key, f"not a column of {self.source.path}", ds.column_names
            )
        self._hash.update(getattr(ds, "_fingerprint", self.source.path).encode())
        row = 0
        for batch in ds.select_columns([self.text_key]).iter(batch_size=4096):
            for value in batch[self.text_key]:
                yield self._text(value, f"row {row}")
                row += 1


def _chain_first(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


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

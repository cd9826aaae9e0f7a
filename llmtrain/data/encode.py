"""Tokenize batches of documents into one flat token array plus per-document lengths.

Output matches Megatron-LM's preprocess_data with a HuggingFaceTokenizer: `tokenizer(text).input_ids`
(post-processor special tokens included), then EOD appended to every non-empty document.

Fast path (same ids, a fraction of the CPU on prose), for byte-level BPE tokenizers whose pre-tokenizer
is GPT-2's or Llama 3's regex (CHUNKABLE_PATTERNS). A document is cut before every " " followed by a
non-space character. Such a position always starts a new pre-token: in those regexes a space inside or
at the end of a pre-token only occurs in a whitespace run, and a run stops before the space of the next
word (`\\s+(?!\\S)` backs off by one); the only lookahead sees a space there in the whole text and the end
of the string in the chunk, and passes both. BPE works per pre-token, so the ids of a document are the
ids of its chunks, one after the other. Chunks repeat a lot (Zipf), so each distinct chunk is encoded
once and remembered: new chunks are encoded many at a time, joined into long strings (by the same
argument) and cut apart again where the byte lengths of their tokens reach the chunk boundaries, which
must coincide; the ids of a batch are then gathered with numpy. Documents holding an added token's text
go through the tokenizer whole, and a sample of documents is re-encoded whole and compared, so a violated
assumption stops the run instead of writing different data.
"""

import json
import os
import re
from itertools import chain, islice, pairwise, repeat

import numpy as np

from llmtrain.data.sources import Problem, encodable, parse_jsonl
from llmtrain.errors import UserError

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (  # also tiktoken's cl100k_base
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHUNKABLE_PATTERNS = (GPT2_PATTERN, LLAMA3_PATTERN)
# Python's \s (str.isspace) is a superset of the Rust regex's \s, so every cut is also a cut for Rust.
CHUNK_SPLIT = re.compile(r"(?= \S)")
IRREGULAR = re.compile(r" (?:\s|\Z)")  # a space that does not start a chunk
VERIFY_EVERY = 16  # batches between two whole-document checks of the fast path
JOIN_CHARS = 1 << 16  # text per joined string when learning new chunks


class FastPathMismatch(UserError):
    pass


def chunkable(tokenizer_json: dict) -> bool:
    """Whether the fast path gives the same ids as the tokenizer for this tokenizer.json."""
    model = tokenizer_json.get("model") or {}
    if tokenizer_json.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return False
    post = tokenizer_json.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") in CHUNKABLE_PATTERNS
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space")
    )


class Encoder:
    """Callable: list of texts -> (tokens, lengths, bad). `lengths` has one entry per text (EOD included,
    0 for a text without tokens); `bad` lists the texts that could not be encoded (lone surrogates)."""

    def __init__(self, tok, eos_id: int | None, dtype, fast: bool = True, max_chunks: int = 1_000_000):
        self.tok, self.eos, self.dtype = tok, eos_id, np.dtype(dtype)
        spec = json.loads(tok.to_str())
        self.fast = fast and chunkable(spec)
        # Added tokens are matched on the raw text before pre-tokenization: such documents skip chunking.
        self.added_prefixes = sorted({t["content"][:2] for t in spec.get("added_tokens", []) if t["content"]})
        self.max_chunks = max_chunks  # bounds the memory of the chunk cache
        self.batches = 0
        if self.fast:  # byte-level vocabulary: one character of a token is one byte of text
            vocab = tok.get_vocab(with_added_tokens=False)
            self.token_bytes = np.zeros(max(vocab.values()) + 1, np.int64)
            self.token_bytes[list(vocab.values())] = [len(piece) for piece in vocab]
        self._clear()

    def _clear(self) -> None:
        """Chunk cache. `spaced` maps a piece p to the ids of " " + p (the common case, no string built),
        `exact` maps a chunk to its own ids; both give k: the ids are store[starts[k] : starts[k] + lens[k]]."""
        self.spaced: dict[str, int] = {}
        self.exact: dict[str, int] = {}
        self.store = np.empty(1 << 16, self.dtype)
        self.used = 0
        self.starts = np.empty(1 << 14, np.int64)
        self.lens = np.empty(1 << 14, np.int64)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        self.batches += 1
        if self.fast and texts:
            try:
                return self._fast(texts)
            except (TypeError, ValueError):  # a str the Rust side rejects: the whole path sorts it out
                pass
        return self._whole(texts)

    def _with_eos(self, tokens: np.ndarray, doc_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.eos is None:
            return tokens.astype(self.dtype, copy=False), doc_lens.astype(np.int32)
        has = doc_lens > 0
        lengths = doc_lens + has
        ends = np.cumsum(lengths)
        out = np.empty(int(ends[-1]) if ends.size else 0, self.dtype)
        is_token = np.ones(out.size, bool)
        is_token[ends[has] - 1] = False
        out[is_token] = tokens
        out[~is_token] = self.eos
        return out, lengths.astype(np.int32)

    def _whole(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        bad: list[int] = []
        try:
            ids = [e.ids for e in self.tok.encode_batch_fast(texts)]
        except (TypeError, ValueError):  # lone surrogates: find and drop the culprits
            bad = [i for i, t in enumerate(texts) if not encodable(t)]
            skip = set(bad)
            ok = iter(self.tok.encode_batch_fast([t for i, t in enumerate(texts) if i not in skip]))
            ids = [[] if i in skip else next(ok).ids for i in range(len(texts))]
        doc_lens = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(chain.from_iterable(ids), self.dtype, int(doc_lens.sum()))
        return (*self._with_eos(flat, doc_lens), bad)

    def _fast(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        # Each document becomes `exact` chunks followed by `spaced` pieces. A regular document (every
        # " " followed by a non-space) is cut by str.split(" "): a first exact chunk, then pieces that
        # each stand for " " + piece. Others are cut by CHUNK_SPLIT (several times slower), and a
        # document holding an added token's text stays whole.
        prefixes, irregular, split = self.added_prefixes, IRREGULAR.search, CHUNK_SPLIT.split
        exact: list[str] = []
        regular: list[list[str]] = []
        n_exact = np.ones(len(texts), np.int64)
        n_spaced = np.zeros(len(texts), np.int64)
        for i, t in enumerate(texts):
            if prefixes and any(p in t for p in prefixes):
                exact.append(t)
            elif irregular(t):
                chunks = split(t)
                exact += chunks
                n_exact[i] = len(chunks)
            else:
                pieces = t.split(" ")
                exact.append(pieces[0])
                regular.append(pieces)
                n_spaced[i] = len(pieces) - 1
        spaced = list(chain.from_iterable(islice(p, 1, None) for p in regular))
        if len(self.spaced) + len(self.exact) > self.max_chunks:
            self._clear()  # bounded memory; frequent chunks come back quickly
        per_doc = n_exact + n_spaced  # >= 1
        firsts = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        is_exact = np.arange(firsts.size) - firsts < np.repeat(n_exact, per_doc)
        cid = np.empty(firsts.size, np.int64)
        cid[is_exact] = self._lookup(self.exact, exact, spaced=False)
        cid[~is_exact] = self._lookup(self.spaced, spaced, spaced=True)
        lens = self.lens[cid]
        ends = np.cumsum(lens)
        src = np.repeat(self.starts[cid] - (ends - lens), lens) + np.arange(int(ends[-1]))
        doc_lens = np.add.reduceat(lens, np.cumsum(per_doc) - per_doc)
        tokens, lengths = self._with_eos(self.store[src], doc_lens)
        if self.batches % VERIFY_EVERY == 1:
            self._verify(texts, tokens, lengths)
        return tokens, lengths, []

    def _lookup(self, table: dict[str, int], keys: list[str], spaced: bool) -> np.ndarray:
        """Cache ids of `keys`, learning the missing ones first."""
        cid = np.fromiter(map(table.get, keys, repeat(-1)), np.int64, len(keys))
        missing = np.flatnonzero(cid < 0).tolist()
        if missing:
            new = list(dict.fromkeys([keys[i] for i in missing]))  # distinct, in order
            self._learn(table, new, [" " + k for k in new] if spaced else new, joinable=spaced)
            cid[missing] = [table[keys[i]] for i in missing]
        return cid

    def _learn(self, table: dict[str, int], keys: list[str], texts: list[str], joinable=False) -> None:
        """Encode new chunks (`texts`, each alone) and remember their ids under `keys` in `table`.
        Chunks that start with " " + non-space (all of them when `joinable`) are encoded joined."""
        if not joinable:
            prefixes = self.added_prefixes
            join, alone = [], []
            for i, c in enumerate(texts):
                ok = len(c) > 1 and c[0] == " " and not c[1].isspace()
                (join if ok and not any(p in c for p in prefixes) else alone).append(i)
            if alone:
                ids = [e.ids for e in self.tok.encode_batch_fast([texts[i] for i in alone])]
                lens = np.fromiter(map(len, ids), np.int64, len(ids))
                flat = np.fromiter(chain.from_iterable(ids), np.int64, int(lens.sum()))
                self._add(table, [keys[i] for i in alone], flat, lens)
            keys, texts = [keys[i] for i in join], [texts[i] for i in join]
        if texts:
            self._add(table, keys, *self._encode_joined(texts))

    def _encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of each text encoded alone (concatenated) and their counts, for texts that each start with
        " " + non-space: joined into long strings, encoded, cut where the token bytes reach a text end."""
        sizes = np.fromiter(map(len, texts), np.int64, len(texts))
        group = (np.cumsum(sizes) - 1) // JOIN_CHARS
        bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(texts)]
        groups = [texts[a:b] for a, b in pairwise(bounds)]
        joined = ["".join(g) for g in groups]
        prefixes = self.added_prefixes
        encodings = self.tok.encode_batch_fast(joined)
        all_ids, all_lens = [], []
        for g, j, e in zip(groups, joined, encodings):
            if any(p in j for p in prefixes):  # an added token's text across a join: encode one by one
                ids = [x.ids for x in self.tok.encode_batch_fast(g)]
                all_lens.append(np.fromiter(map(len, ids), np.int64, len(ids)))
                all_ids.append(np.fromiter(chain.from_iterable(ids), np.int64, int(all_lens[-1].sum())))
                continue
            ids = np.array(e.ids, np.int64)
            tok_end = np.cumsum(self.token_bytes[ids])
            nbytes = map(len, g) if j.isascii() else map(len, map(str.encode, g))
            text_end = np.cumsum(np.fromiter(nbytes, np.int64, len(g)))
            k = np.searchsorted(tok_end, text_end)
            if k[-1] >= tok_end.size or not np.array_equal(tok_end[k], text_end):
                raise FastPathMismatch(
                    "prepare: a token crosses a chunk boundary, so the chunked fast path does not hold for "
                    "this tokenizer; rerun with fast=false (and please report the tokenizer)"
                )
            all_ids.append(ids)
            all_lens.append(np.diff(k + 1, prepend=0))
        return np.concatenate(all_ids), np.concatenate(all_lens)

    def _add(self, table: dict[str, int], keys: list[str], ids: np.ndarray, lens: np.ndarray) -> None:
        n0, n = len(self.spaced) + len(self.exact), len(keys)
        while self.used + ids.size > self.store.size:
            self.store = np.resize(self.store, 2 * self.store.size)
        while n0 + n > self.starts.size:
            self.starts = np.resize(self.starts, 2 * self.starts.size)
            self.lens = np.resize(self.lens, 2 * self.lens.size)
        self.store[self.used : self.used + ids.size] = ids
        self.starts[n0 : n0 + n] = self.used + np.cumsum(lens) - lens
        self.lens[n0 : n0 + n] = lens
        self.used += ids.size
        table.update(zip(keys, range(n0, n0 + n)))

    def _verify(self, texts: list[str], tokens: np.ndarray, lengths: np.ndarray) -> None:
        i = (self.batches // VERIFY_EVERY) % len(texts)
        start = int(lengths[:i].sum())
        expect = self.tok.encode(texts[i]).ids
        if expect and self.eos is not None:
            expect.append(self.eos)
        if tokens[start : start + int(lengths[i])].tolist() != expect:
            raise FastPathMismatch(
                "prepare: the chunked fast path disagrees with the tokenizer on a document; "
                "rerun with fast=false (and please report the tokenizer)"
            )


def encode_job(encoder: Encoder, texts, jsonl, first_line: int, text_key: str):
    """One batch: parse (raw JSON lines), encode -> (tokens, lengths of written documents, problems)."""
    lines = None
    problems: list[Problem] = []
    if jsonl is not None:
        texts, lines, problems = parse_jsonl(jsonl, first_line, text_key)
    tokens, lengths, bad = encoder(texts)
    if bad or not lengths.all():
        where = (
            [str(n) for n in lines] if lines else [f"document {i + 1} of a batch" for i in range(len(texts))]
        )
        problems += [("non_utf8", where[i], "cannot be encoded as UTF-8") for i in bad]
        skip = set(bad)
        zero = np.flatnonzero(lengths == 0)
        problems += [("empty", where[i], "no tokens") for i in zero if i not in skip]
        lengths = lengths[lengths > 0]
    return tokens, lengths, problems


_WORKER: dict = {}


def init_worker(tokenizer_file: str, eos_id: int | None, dtype: str, fast: bool) -> None:
    """Process-pool initializer: one tokenizer (one Rust thread) and one chunk cache per worker."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # the pool supplies the parallelism
    from tokenizers import Tokenizer

    _WORKER["encoder"] = Encoder(Tokenizer.from_file(tokenizer_file), eos_id, dtype, fast)


def encode_in_worker(texts, jsonl, first_line: int, text_key: str):
    return encode_job(_WORKER["encoder"], texts, jsonl, first_line, text_key)

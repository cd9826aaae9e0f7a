"""Tokenize batches of documents into one flat token array plus per-document lengths.

Runs in worker processes (one tokenizer each, one Rust thread each) or in threads of the main process.
Matches Megatron-LM's preprocess_data with a HuggingFaceTokenizer: `tokenizer(text).input_ids`
(special tokens of the post-processor included), then EOD appended to every non-empty document.
"""

import os

import numpy as np

_STATE: dict = {}


def init_worker(tokenizer_file: str, eos_id: int | None, dtype: str, threads: int) -> None:
    """Process-pool initializer: load the tokenizer once per worker."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # before the first encode starts rayon's pool
    from tokenizers import Tokenizer

    _STATE.update(tok=Tokenizer.from_file(tokenizer_file), eos=eos_id, dtype=np.dtype(dtype))


def encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    return encode(_STATE["tok"], texts, _STATE["eos"], _STATE["dtype"])


def encode(tok, texts: list[str], eos_id: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (tokens, lengths, bad): `bad` documents could not be encoded (lone surrogates) and are dropped;
    documents that encode to nothing get length 0 (the caller drops them)."""
    bad = 0
    try:
        encodings = tok.encode_batch_fast(texts)
    except (TypeError, ValueError):  # a str the Rust side rejects; find and drop the culprits
        ok = []
        for t in texts:
            try:
                t.encode("utf-8")
                ok.append(t)
            except UnicodeEncodeError:
                bad += 1
        encodings = tok.encode_batch_fast(ok)
    flat: list[int] = []
    lengths = np.empty(len(encodings), dtype=np.int32)
    extra = 0 if eos_id is None else 1
    for i, enc in enumerate(encodings):
        ids = enc.ids
        if ids:
            flat += ids
            if extra:
                flat.append(eos_id)
            lengths[i] = len(ids) + extra
        else:
            lengths[i] = 0
    return np.array(flat, dtype=dtype), lengths, bad

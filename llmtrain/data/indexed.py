"""Streaming writer for Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`, format version 1).

Byte-identical to `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` with one sequence per
document (what `tools/preprocess_data.py` writes without sentence splitting); tests check that against
Megatron's builder and read the result back with Megatron's `IndexedDataset`. It is written here rather
than imported because importing megatron.core costs ~2.5 s of a prepare run, and because Megatron's
builder keeps every length in a Python list while this one spills them to a side file, so memory stays
bounded whatever the input size.
"""

import os
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # megatron DType codes


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Same rule as megatron's DType.optimal_dtype (note: 65500, not 65536)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Appends documents (token arrays) to `bin_path` and their lengths to `lens_path`.

    Both files can be reopened at a committed size after a crash (`resume_bytes`, `resume_docs`), which is
    what makes prepare resumable.
    """

    def __init__(self, bin_path: Path, lens_path: Path, dtype: np.dtype, resume_bytes=0, resume_docs=0):
        self.bin_path, self.lens_path, self.dtype = Path(bin_path), Path(lens_path), np.dtype(dtype)
        self._bin = open(self.bin_path, "r+b" if resume_bytes else "wb")  # noqa: SIM115 (closed in close())
        self._lens = open(self.lens_path, "r+b" if resume_docs else "wb")  # noqa: SIM115
        # Drop whatever an interrupted run wrote after its last commit.
        self._bin.truncate(resume_bytes)
        self._bin.seek(resume_bytes)
        self._lens.truncate(resume_docs * 4)
        self._lens.seek(resume_docs * 4)
        self.num_bytes, self.num_docs = resume_bytes, resume_docs

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append a chunk: `tokens` is the concatenation of documents with lengths `lengths`."""
        self._bin.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))
        self._lens.write(memoryview(np.ascontiguousarray(lengths, dtype=np.int32)))
        self.num_bytes += tokens.size * self.dtype.itemsize
        self.num_docs += lengths.size

    def commit(self) -> None:
        """Make everything written so far durable (the caller then records the position)."""
        for f in (self._bin, self._lens):
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._bin.close()
        self._lens.close()


def write_index(idx_path: Path, lens_path: Path, dtype: np.dtype, chunk: int = 1 << 20) -> None:
    """Write the .idx for the document lengths in `lens_path`, streaming `chunk` documents at a time."""
    dtype = np.dtype(dtype)
    n = lens_path.stat().st_size // 4
    with open(idx_path, "wb") as out:
        out.write(INDEX_HEADER)
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", DTYPE_CODES[dtype]))
        out.write(struct.pack("<Q", n))  # sequences
        out.write(struct.pack("<Q", n + 1))  # document boundaries (one sequence per document)
        lens = np.memmap(lens_path, dtype=np.int32, mode="r") if n else np.zeros(0, np.int32)
        for i in range(0, n, chunk):  # sequence lengths
            out.write(memoryview(np.ascontiguousarray(lens[i : i + chunk])))
        offset = 0
        for i in range(0, n, chunk):  # byte offsets of every sequence
            part = lens[i : i + chunk].astype(np.int64) * dtype.itemsize
            starts = np.cumsum(part) - part + offset
            out.write(memoryview(starts))
            offset += int(part.sum())
        for i in range(0, n + 1, chunk):  # document index: 0..n
            out.write(memoryview(np.arange(i, min(i + chunk, n + 1), dtype=np.int64)))
        out.flush()
        os.fsync(out.fileno())
        del lens


ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron DType code -> bytes per token
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def describe_pair(prefix: str) -> dict:
    """Read `PREFIX.idx` and check it describes exactly the bytes of `PREFIX.bin`.

    Returns {'sequences', 'documents', 'tokens'}; raises ValueError with the problem in words (the caller
    names the config key and the fix).
    """
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    idx_bytes = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or not head.startswith(INDEX_HEADER):
        raise ValueError(f"{idx} is not a Megatron index (bad header)")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n, docs = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in ITEM_SIZES:
        raise ValueError(f"{idx}: unsupported index version {version} or dtype code {code}")
    expected_idx = HEADER_BYTES + n * 4 + n * 8 + docs * 8
    if idx_bytes != expected_idx:
        raise ValueError(f"{idx} has {idx_bytes} bytes but its header describes {expected_idx} (truncated?)")
    tokens, bin_expected = 0, 0
    if n:
        lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(n,))
        last_pointer = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * n, shape=(n,))[-1]
        tokens = int(lengths.sum(dtype=np.int64))
        bin_expected = int(last_pointer) + int(lengths[-1]) * ITEM_SIZES[code]
        if tokens * ITEM_SIZES[code] != bin_expected:
            raise ValueError(f"{idx}: sequence offsets and lengths disagree (damaged index)")
        del lengths
    bin_bytes = bin_.stat().st_size
    if bin_bytes != bin_expected:
        raise ValueError(
            f"{bin_} has {bin_bytes} bytes but {idx.name} describes {bin_expected} "
            "(a truncated .bin, or the .idx of another dataset)"
        )
    return {"sequences": int(n), "documents": max(int(docs) - 1, 0), "tokens": tokens}

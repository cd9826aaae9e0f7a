"""The indexed-dataset writer: byte-identical to Megatron's IndexedDatasetBuilder, readable by Megatron's
IndexedDataset, and resumable at a committed size."""

import warnings

import numpy as np
import pytest

from llmtrain.data.indexed import IndexedWriter, optimal_dtype, write_index

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


def _docs(rng, n, vocab):
    return [rng.integers(0, vocab, size=int(rng.integers(1, 300))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [4096, 128_256])
def test_same_bytes_as_megatron_builder(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 257, vocab)
    dtype = optimal_dtype(vocab)
    assert dtype == DType.optimal_dtype(vocab)

    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(vocab))
    for d in docs:
        ref.add_document(d, [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))

    w = IndexedWriter(tmp_path / "ours.bin", tmp_path / "ours.lens", dtype)
    for i in range(0, len(docs), 50):  # chunks of several documents, as prepare writes them
        part = docs[i : i + 50]
        w.write(np.concatenate(part), np.array([len(d) for d in part]))
    w.commit()
    w.close()
    write_index(tmp_path / "ours.idx", tmp_path / "ours.lens", dtype, chunk=7)  # several index chunks

    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs)
    assert all(np.array_equal(ds[i], docs[i]) for i in (0, 100, 256))


def test_resume_truncates_to_the_commit(tmp_path):
    docs = _docs(np.random.default_rng(1), 20, 4096)
    w = IndexedWriter(tmp_path / "a.bin", tmp_path / "a.lens", np.uint16)
    w.write(np.concatenate(docs[:10]), np.array([len(d) for d in docs[:10]]))
    w.commit()
    committed = (w.num_bytes, w.num_docs)
    w.write(np.concatenate(docs[10:15]), np.array([len(d) for d in docs[10:15]]))  # lost in a "crash"
    w.close()
    w = IndexedWriter(tmp_path / "a.bin", tmp_path / "a.lens", np.uint16, *committed)
    w.write(np.concatenate(docs[10:]), np.array([len(d) for d in docs[10:]]))
    w.close()
    write_index(tmp_path / "a.idx", tmp_path / "a.lens", np.uint16)
    ds = IndexedDataset(str(tmp_path / "a"))
    assert len(ds) == 20 and all(np.array_equal(ds[i], docs[i]) for i in range(20))


def test_empty_dataset_index_matches_megatron(tmp_path):
    # Megatron's reader cannot mmap an empty .bin, so prepare refuses to publish one (test_prepare.py);
    # the writer itself still agrees byte for byte with Megatron's builder on zero documents.
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.finalize(str(tmp_path / "ref.idx"))
    IndexedWriter(tmp_path / "e.bin", tmp_path / "e.lens", np.uint16).close()
    write_index(tmp_path / "e.idx", tmp_path / "e.lens", np.uint16)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"e{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()

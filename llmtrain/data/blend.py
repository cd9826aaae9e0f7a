"""Train/valid/test datasets through megatron.core.datasets (GPTDataset + BlendedMegatronDatasetBuilder).

Both engines read samples from here, so the sample order depends only on the data config, the seed and
the sequence length -- not on the engine, the DP size or the training budget: every split is built for one
epoch (a weighted blend, which Megatron must size, for the samples its datasets hold in one epoch).
Megatron builds its index caches (document/sample/shuffle indices) on rank 0 first when
torch.distributed is initialized; the other ranks then load them.
"""

import logging
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import ConfigError, UserError


@dataclass
class _TokenizerInfo:
    """What GPTDatasetConfig asks of a tokenizer. `vocab_size` stays None for real data so the token
    dtype comes from each .idx (Megatron would otherwise force one from the vocab size)."""

    eod: int
    vocab_size: int | None = None
    data_identity: tuple = ()

    @property
    def unique_identifiers(self) -> dict:
        # Part of Megatron's index-cache key: re-preparing data under the same prefix must not reuse
        # the index caches of the old contents.
        return {"eod": self.eod, "data": list(self.data_identity)}


def data_identity(prefix: str) -> str:
    """The prepare fingerprint of a dataset, or its .idx size and mtime when it has no manifest."""
    import json

    try:
        return json.loads(Path(prefix + ".manifest.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        st = Path(prefix + ".idx").stat()
        return f"{st.st_size}-{st.st_mtime_ns}"


def parse_blend(paths, key: str = "data.paths") -> tuple[list[str], list[float] | None]:
    """`[prefix]`, `[prefix1, prefix2]` or `[w1, prefix1, w2, prefix2, ...]` -> (prefixes, weights)."""
    items = [str(p) for p in paths]

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) >= 2 and is_number(items[0]):
        if len(items) % 2 or not all(is_number(w) for w in items[0::2]):
            raise ConfigError(
                key,
                list(paths),
                "a weighted blend alternates weight and prefix",
                "[w1, prefix1, w2, prefix2]",
            )
        weights = [float(w) for w in items[0::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(key, list(paths), "blend weights must be >= 0 and not all 0")
        prefixes = items[1::2]
    else:
        weights, prefixes = None, items
    prefixes = [str(Path(p).expanduser()).removesuffix(".bin").removesuffix(".idx") for p in prefixes]
    for p in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(p + s).is_file()]
        if missing:
            raise ConfigError(
                key,
                p,
                f"missing {' and '.join(p + s for s in missing)}",
                "a prefix written by `python -m llmtrain.data.prepare`",
            )
        check_dataset_files(p, key)
    return prefixes, weights


def check_dataset_files(prefix: str, key: str = "data.paths") -> dict:
    """The .idx must describe exactly the .bin's bytes, and agree with the prepare manifest where present."""
    import json

    from llmtrain.data.indexed import describe_pair

    fix = "rebuild both files with `python -m llmtrain.data.prepare`"
    try:
        found = describe_pair(prefix)
    except ValueError as e:
        raise UserError(f"{key}: {e}; {fix}") from None
    manifest_path = Path(prefix + ".manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        return found
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {manifest_path} is unreadable ({e}); {fix}") from None
    for field in ("documents", "tokens"):
        if field in manifest and manifest[field] != found[field]:
            raise UserError(
                f"{key}: {manifest_path} records {manifest[field]} {field} but {prefix}.idx describes "
                f"{found[field]} (files of different datasets); {fix}"
            )
    return found


def num_sequences(prefix: str) -> int:
    """Sequence count from the .idx header (magic 9 bytes, version 8, dtype 1, then this <Q)."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(26)
    return struct.unpack("<Q", head[18:26])[0]


def _check_nonempty_splits(prefixes: list[str], split_matrix, split: str) -> None:
    """Megatron's builder never returns on a split that gets no document; fail with the fix instead."""
    for prefix in prefixes:
        n = num_sequences(prefix)
        for name, bounds in zip(("train", "valid"), split_matrix[:2]):
            if bounds is None:
                continue
            beg, end = (round(b * float(n)) for b in bounds)  # Megatron's rounding
            if end <= beg:
                raise ConfigError(
                    "data.split",
                    split,
                    f"leaves the {name} share of {prefix} ({n} documents) empty",
                    "more documents, or a larger share, e.g. \"data.split='90,10,0'\"",
                )


def _sequence_lengths(prefix: str):
    """Token count of every sequence, from the .idx (read by check_dataset_files before this runs)."""
    import numpy as np

    from llmtrain.data.indexed import HEADER_BYTES

    n = num_sequences(prefix)
    if not n:
        return np.zeros(0, np.int64)
    return np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(n,))


@dataclass
class _Shares:
    """Tokens of one dataset in the train and valid shares of a split (documents by Megatron's rounding)."""

    prefix: str
    lengths: object  # tokens per document
    train: int
    valid: int

    @property
    def total(self) -> int:
        return int(self.lengths.sum())


def _shares(prefixes: list[str], split_matrix) -> list[_Shares]:
    out = []
    for prefix in prefixes:
        lengths = _sequence_lengths(prefix)
        n = float(len(lengths))
        tokens = [
            0 if bounds is None else int(lengths[round(bounds[0] * n) : round(bounds[1] * n)].sum())
            for bounds in split_matrix[:2]
        ]
        out.append(_Shares(prefix, lengths, *tokens))
    return out


def _split_that_fits(lengths, needed: int) -> str | None:
    """The 'train,valid,0' split (percent) with the largest train share where train and valid both hold
    `needed` tokens, if any."""
    import numpy as np

    n, cum = len(lengths), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    for train in range(99, 0, -1):
        k = round(train / 100 * n)
        if cum[k] >= needed and cum[n] - cum[k] >= needed:
            return f"data.split='{train},{100 - train},0'"
    return None


def _fixes(shares: list[_Shares], split_matrix, needed: int) -> str:
    """What would fit: a smaller seq_length (train and, where the split has one, valid samples), a split
    that fits both, more data. Each changes something: the current values are what does not fit."""
    train_fits = max(s.train for s in shares) - 1
    fits = max(min(s.train, s.valid) for s in shares) - 1 if split_matrix[1] is not None else train_fits
    fixes = []
    if fits >= 1:
        fixes.append(f"model.seq_length<={fits}")
        if fits < train_fits and train_fits < needed - 1:
            fixes[-1] += f" (<={train_fits} with train.eval_interval=0)"
    elif train_fits >= 1 and train_fits < needed - 1:
        fixes.append(f"model.seq_length<={train_fits} with train.eval_interval=0")
    split = _split_that_fits(max(shares, key=lambda s: s.total).lengths, needed)
    if split:
        fixes.append(split)
    fixes.append("more data")
    return ", or ".join(fixes)


def _where(shares: list[_Shares], best: _Shares) -> str:
    return best.prefix if len(shares) == 1 else f"the largest of the {len(shares)} datasets, {best.prefix}"


def _check_train_fits(prefixes: list[str], split_matrix, split: str, seq_length: int) -> None:
    """A training sample takes seq_length + 1 tokens of one dataset's train share (Megatron's extra token
    for the labels); where no share holds that many, Megatron builds an empty train set."""
    needed = seq_length + 1
    beg_frac, end_frac = split_matrix[0]
    for prefix in prefixes:  # the usual case, cheaply: the share's first `needed` documents suffice
        lengths = _sequence_lengths(prefix)
        beg, end = (round(b * float(len(lengths))) for b in (beg_frac, end_frac))
        if int(lengths[beg : min(end, beg + needed)].sum()) >= needed:
            return
    shares = _shares(prefixes, split_matrix)
    best = max(shares, key=lambda s: s.train)
    if best.train >= needed:
        return
    raise ConfigError(
        "model.seq_length",
        seq_length,
        f"a training sample takes {needed} tokens but the train share of data.split={split!r} holds "
        f"{best.train} (of {best.total}) in {_where(shares, best)}; use {_fixes(shares, split_matrix, needed)}",
    )


def short_valid_share(prefixes: list[str] | None, split: str, seq_length: int) -> str:
    """Why a split's valid share yields no sample, with the fix, as one line (for evaluation's error)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    if prefixes is None or split_matrix[1] is None:
        return (
            f"data.split={split!r} has no valid share; evaluation needs one, e.g. \"data.split='949,50,1'\""
        )
    needed = seq_length + 1
    shares = _shares(prefixes, split_matrix)
    best = max(shares, key=lambda s: s.valid)
    return (
        f"model.seq_length={seq_length}: an evaluation sample takes {needed} tokens but the valid share of "
        f"data.split={split!r} holds {best.valid} (of {best.total}) in {_where(shares, best)}; use "
        f"{_fixes(shares, split_matrix, needed)}, or train.eval_interval=0"
    )


@contextmanager
def _single_process_guard(cache_dir: str):
    """Without torch.distributed: Megatron's BlendedDataset still calls dist.get_rank() on a cache miss,
    so it answers 0 here; and a file lock keeps two runs sharing `cache_dir` from writing the same index
    files at once (with torch.distributed, Megatron builds on rank 0 first and the others wait)."""
    from contextlib import suppress

    import torch.distributed as dist

    from llmtrain.fsio import write_error

    # Megatron writes the index caches inside this block. A read-only or full cache dir is one line, and
    # the files this build made go: Megatron takes the four files of a split being there for a cache hit,
    # so a truncated one would be loaded by the next run.
    cache = Path(cache_dir)
    before = set(cache.iterdir()) if cache.is_dir() else set()
    try:
        if dist.is_available() and dist.is_initialized():
            yield
            return
        from filelock import FileLock

        cache.mkdir(parents=True, exist_ok=True)
        saved = dist.get_rank
        dist.get_rank = lambda *a, **k: 0
        try:
            with FileLock(str(cache / ".build.lock")):
                yield
        finally:
            dist.get_rank = saved
    except OSError as e:
        fix = "set data.index_cache_dir=DIR (default: data.cache_dir/index) to a writable directory with room"
        err = write_error(e, cache, fix)
        if err is None:
            raise
        for path in set(cache.iterdir()) - before if cache.is_dir() else ():
            if path.name != ".build.lock":
                with suppress(OSError):
                    path.unlink()
        raise err from None


def build_datasets(
    prefixes: list[str] | None,
    weights: list[float] | None,
    *,
    split: str,
    seq_length: int,
    seed: int,
    eod: int,
    vocab_size: int,
    cache_dir: str,
    eod_mask_loss: bool = False,
):
    """-> [train, valid, test] datasets (None where the split is empty); mock data when prefixes is None."""
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    with warnings.catch_warnings():  # megatron.core's import warns about TE/Apex, irrelevant to data
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    mock = prefixes is None
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if mock else (prefixes, weights),
        split=split,
        path_to_cache=str(Path(cache_dir).expanduser()),
        tokenizer=_TokenizerInfo(
            eod=eod,
            vocab_size=vocab_size if mock else None,
            data_identity=() if mock else tuple(data_identity(p) for p in prefixes),
        ),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # causal attention; no (seq x seq) mask per sample
    )
    # The test share stays out of train/valid (the boundaries come from the full split string) but is
    # not built: nothing here evaluates on it, and Megatron loops forever on a split without documents.
    config.split_matrix[2] = None
    if not mock:
        _check_nonempty_splits(prefixes, config.split_matrix, split)
        _check_train_fits(prefixes, config.split_matrix, split, seq_length)
    sizes = [None, None, None]
    if weights is not None:  # Megatron needs a size to blend by weight: one epoch's worth, as a count
        tokens = sum(check_dataset_files(p)["tokens"] for p in prefixes)
        sizes = [
            1 if bounds is None else max(1, int(tokens * (bounds[1] - bounds[0]) / seq_length))
            for bounds in config.split_matrix
        ]
    cls = MockGPTDataset if mock else GPTDataset
    try:
        with _single_process_guard(config.path_to_cache):
            return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    except (AssertionError, ValueError, IndexError) as e:
        raise UserError(
            f"data: megatron.core.datasets could not build the splits ({type(e).__name__}: {e}); "
            f"check data.paths and data.split={split!r} (every split needs documents)"
        ) from e

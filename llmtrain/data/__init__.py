"""Data for training: tokenizer + train/valid samples from Megatron indexed datasets, addressed by sample.

Sampling contract (engine-, DP-size- and budget-independent): the data position of a run is the number of
samples it has consumed, so a resume continues from it whatever the new global batch size or train.steps.
The batch that starts at global sample s gives micro-batch j of DP rank r the samples
s + j*mbs*dp + r*mbs + [0, mbs). Megatron's GPTDataset is asked for one epoch (its shuffle depends on the
number of samples it is asked for, so a budget-sized build would reorder the data whenever train.steps
changes); later epochs revisit it in another order (`EpochCycle`). Validation uses the same layout over a
fixed prefix of the valid dataset. The datasets come from megatron.core.datasets (see blend.py), so the
first epoch is the order Megatron-LM gives the same blend, split, seed and sequence length for one epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmtrain.data.tokenizer import eos_token, load_tokenizer, vocab_size
from llmtrain.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: `python -m llmtrain.data.prepare` does not need it (~1 s, ~200 MB).
__all__ = ["TrainData", "build_data", "load_tokenizer"]


@dataclass
class TrainData:
    train: object  # a megatron GPTDataset / BlendedDataset (indexable, returns dicts of tensors)
    valid: object | None
    seq_length: int
    dp_rank: int
    dp_size: int
    micro_batch_size: int
    global_batch_size: int
    vocab_size: int
    eod: int
    fingerprint: str = ""  # identifies the sample order; checkpoints store it and a resume compares it
    no_valid_why: str = ""  # where valid is None: why, with the fix (evaluation's error line)

    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _micro_batch(self, dataset, first: int) -> dict[str, torch.Tensor]:
        import torch

        samples = [dataset[i] for i in range(first, first + self.micro_batch_size)]
        return {
            "tokens": torch.stack([s["tokens"] for s in samples]).long(),
            "labels": torch.stack([s["labels"] for s in samples]).long(),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
        }

    def batch_at(self, first_sample: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch that starts at global sample `first_sample`."""
        mbs, dp = self.micro_batch_size, self.dp_size
        return [
            self._micro_batch(self.train, first_sample + j * mbs * dp + self.dp_rank * mbs)
            for j in range(self.num_micro_batches())
        ]

    def train_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Step `step` of a run that kept this global batch size throughout (tests, eval tools)."""
        return self.batch_at(step * self.global_batch_size)

    def valid_batches(self, num_steps: int) -> list[dict[str, torch.Tensor]]:
        if self.valid is None:
            if self.no_valid_why:
                raise UserError(self.no_valid_why)
            raise ConfigError(
                "data.split",
                "(no valid share)",
                "evaluation needs a valid split",
                "e.g. \"data.split='949,50,1'\"",
            )
        mbs, dp = self.micro_batch_size, self.dp_size
        base = [
            k * self.global_batch_size + j * mbs * dp + self.dp_rank * mbs
            for k in range(num_steps)
            for j in range(self.num_micro_batches())
        ]
        return [self._micro_batch(self.valid, b) for b in base]


class EpochCycle:
    """Endless view of a one-epoch dataset: epoch e > 0 visits it in another order, (a_e*i + b_e) mod n with
    a_e coprime to n, drawn from the seed (O(1) memory, unlike a permutation of every sample)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)
        self._epoch_maps: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.n

    def _map(self, epoch: int) -> tuple[int, int]:
        if epoch not in self._epoch_maps:
            import math
            import random

            r = random.Random(f"{self.seed}-{epoch}")
            a = r.randrange(1, max(self.n, 2))
            while math.gcd(a, self.n) != 1:
                a = r.randrange(1, max(self.n, 2))
            self._epoch_maps[epoch] = (a, r.randrange(self.n))
        return self._epoch_maps[epoch]

    def __getitem__(self, i: int):
        epoch, j = divmod(int(i), self.n)
        if epoch:
            a, b = self._map(epoch)
            j = (a * j + b) % self.n
        return self.dataset[j]


SAMPLE_ORDER = "one-epoch+affine-cycle-v1"  # part of the fingerprint: a change of scheme is a change of order


def build_data(cfg, *, dp_rank: int = 0, dp_size: int = 1, log=print) -> TrainData:
    """Build this DP rank's view of the train/valid data described by the resolved config `cfg`."""
    from llmtrain.data.blend import build_datasets, parse_blend, short_valid_share
    from llmtrain.data.builtin import builtin_prefix

    d = cfg.data
    tok = load_tokenizer(d.tokenizer)
    vocab = vocab_size(tok)
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"smaller than the tokenizer's vocabulary ({vocab}, {d.tokenizer})",
            f">= {vocab}",
        )
    _, eod = eos_token(d.tokenizer, d.get("eos") or None)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs % (mbs * dp_size):
        raise ConfigError(
            "train.global_batch_size", gbs, f"not divisible by micro_batch_size*dp = {mbs * dp_size}"
        )

    if d.get("mock", False):
        prefixes, weights = None, None
    elif d.paths:
        from llmtrain.data.provenance import check_data_tokenizer

        prefixes, weights = parse_blend(d.paths)
        for prefix in prefixes:
            check_data_tokenizer(prefix, d.tokenizer, cfg.model.vocab_size)
    else:
        prefixes, weights = [builtin_prefix(d.builtin, d.tokenizer, d.cache_dir, log=log)], None
    index_dir = d.get("index_cache_dir") or f"{d.cache_dir}/index"
    order_seed = cfg.train.seed if d.get("seed") is None else d.seed
    train, valid, _test = build_datasets(
        prefixes,
        weights,
        split=d.split,
        seq_length=cfg.model.seq_length,
        seed=order_seed,
        eod=eod,
        vocab_size=vocab,
        cache_dir=index_dir,
        eod_mask_loss=bool(d.get("eod_mask_loss", False)),
    )
    if train is None or len(train) == 0:  # blend.build_datasets says what is short first; a fallback
        raise ConfigError(
            "data.split",
            d.split,
            f"leaves no training sample of model.seq_length={cfg.model.seq_length}",
            "more data, a smaller model.seq_length or a larger train share",
        )
    has_valid = valid is not None and len(valid) > 0
    import hashlib

    fingerprint = hashlib.sha256(
        f"{getattr(train, 'unique_description_hash', '')}|{SAMPLE_ORDER}".encode()
    ).hexdigest()[:16]
    return TrainData(
        train=EpochCycle(train, order_seed),
        valid=EpochCycle(valid, order_seed) if has_valid else None,
        seq_length=cfg.model.seq_length,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        vocab_size=vocab,
        eod=eod,
        fingerprint=fingerprint,
        no_valid_why="" if has_valid else short_valid_share(prefixes, d.split, cfg.model.seq_length),
    )

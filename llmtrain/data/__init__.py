"""Data for training: tokenizer + train/valid samples from Megatron indexed datasets, addressed by step.

Sampling contract (engine- and DP-size independent, exact resume from the step number alone): global
step k covers the global samples [k*GBS, (k+1)*GBS) of the train dataset; micro-batch j of DP rank r
holds samples k*GBS + j*mbs*dp + r*mbs + [0, mbs). Validation uses the same layout over a fixed
prefix of the valid dataset. The datasets come from megatron.core.datasets (see blend.py), so the
sample order is the one Megatron-LM would produce for the same blend, split, seed and sequence length.
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
    fingerprint: str = ""  # identifies the sample order; the loop may store and compare it on resume

    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _micro_batch(self, dataset, first: int) -> dict[str, torch.Tensor]:
        n = len(dataset)
        if first + self.micro_batch_size > n:
            raise UserError(
                f"data: sample {first + self.micro_batch_size - 1} asked of a dataset of {n} samples; "
                "the datasets are sized from train.steps, train.eval_steps and the batch size: rebuild with the new values"
            )
        import torch

        samples = [dataset[i] for i in range(first, first + self.micro_batch_size)]
        return {
            "tokens": torch.stack([s["tokens"] for s in samples]).long(),
            "labels": torch.stack([s["labels"] for s in samples]).long(),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
        }

    def train_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        base = step * self.global_batch_size
        mbs, dp = self.micro_batch_size, self.dp_size
        return [
            self._micro_batch(self.train, base + j * mbs * dp + self.dp_rank * mbs)
            for j in range(self.num_micro_batches())
        ]

    def valid_batches(self, num_steps: int) -> list[dict[str, torch.Tensor]]:
        if self.valid is None:
            raise ConfigError(
                "data.split", "(no valid share)", "evaluation needs a valid split", "e.g. 949,50,1"
            )
        mbs, dp = self.micro_batch_size, self.dp_size
        base = [
            k * self.global_batch_size + j * mbs * dp + self.dp_rank * mbs
            for k in range(num_steps)
            for j in range(self.num_micro_batches())
        ]
        return [self._micro_batch(self.valid, b) for b in base]


def _sizes(cfg) -> list[int]:
    gbs = cfg.train.global_batch_size
    eval_samples = max(int(cfg.train.eval_steps), 1) * gbs
    return [max(int(cfg.train.steps), 1) * gbs, eval_samples, gbs]


def build_data(cfg, *, dp_rank: int = 0, dp_size: int = 1, log=print) -> TrainData:
    """Build this DP rank's view of the train/valid data described by the resolved config `cfg`."""
    from llmtrain.data.blend import build_datasets, parse_blend
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
        prefixes, weights = parse_blend(d.paths)
    else:
        prefixes, weights = [builtin_prefix(d.builtin, d.tokenizer, d.cache_dir, log=log)], None
    index_dir = d.get("index_cache_dir") or f"{d.cache_dir}/index"
    train, valid, _test = build_datasets(
        prefixes,
        weights,
        split=d.split,
        seq_length=cfg.model.seq_length,
        seed=cfg.train.seed,
        sizes=_sizes(cfg),
        eod=eod,
        vocab_size=vocab,
        cache_dir=index_dir,
        eod_mask_loss=bool(d.get("eod_mask_loss", False)),
    )
    if train is None or len(train) == 0:
        raise ConfigError("data.split", d.split, "leaves no training data", "e.g. 949,50,1")
    return TrainData(
        train=train,
        valid=valid if valid is not None and len(valid) else None,
        seq_length=cfg.model.seq_length,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        vocab_size=vocab,
        eod=eod,
        fingerprint=getattr(train, "unique_description_hash", ""),
    )

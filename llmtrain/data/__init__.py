"""Data for training: tokenizer + train/valid samples, addressed by global step (exact resume).

INTERIM implementation (contiguous windows over the tokenized shipped corpus); the data-pipeline issue
replaces the internals with Megatron indexed datasets, keeping this interface.

Sampling contract (engine- and DP-size independent): global step k covers the global samples
[k*GBS, (k+1)*GBS); micro-batch j of DP rank r holds samples k*GBS + j*mbs*dp + r*mbs + [0, mbs).
"""

import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"


def load_tokenizer(spec: str) -> Tokenizer:
    path = CORPUS_DIR / "tokenizer.json" if spec == "builtin" else Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    return Tokenizer.from_file(str(path))


@dataclass
class TrainData:
    train_tokens: np.ndarray
    valid_tokens: np.ndarray
    seq_length: int
    dp_rank: int
    dp_size: int
    micro_batch_size: int
    global_batch_size: int
    vocab_size: int

    def _sample(self, tokens: np.ndarray, index: int) -> np.ndarray:
        n_windows = (len(tokens) - 1) // self.seq_length
        start = (index * 7919 % n_windows) * self.seq_length  # fixed permutation-ish stride
        return tokens[start : start + self.seq_length + 1]

    def _micro_batch(self, tokens: np.ndarray, first: int) -> dict[str, torch.Tensor]:
        rows = np.stack([self._sample(tokens, first + i) for i in range(self.micro_batch_size)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(t[:, 1:].shape)}

    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def train_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        base = step * self.global_batch_size
        mbs, dp = self.micro_batch_size, self.dp_size
        return [
            self._micro_batch(self.train_tokens, base + j * mbs * dp + self.dp_rank * mbs)
            for j in range(self.num_micro_batches())
        ]

    def valid_batches(self, num_steps: int) -> list[dict[str, torch.Tensor]]:
        mbs, dp = self.micro_batch_size, self.dp_size
        n = num_steps * self.num_micro_batches()
        return [self._micro_batch(self.valid_tokens, j * mbs * dp + self.dp_rank * mbs) for j in range(n)]


def build_data(cfg, *, dp_rank: int, dp_size: int) -> TrainData:
    tok = load_tokenizer(cfg.data.tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    with lzma.open(CORPUS_DIR / "kjv.jsonl.xz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.int32)
    n_valid = len(arr) // 20
    return TrainData(
        train_tokens=arr[:-n_valid],
        valid_tokens=arr[-n_valid:],
        seq_length=cfg.model.seq_length,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        vocab_size=tok.get_vocab_size(),
    )

"""The chunked fast path of prepare's encoder gives exactly the tokenizer's ids, for GPT-2 style and
Llama 3 style byte-level BPE pre-tokenizers, on adversarial text (whitespace runs, Unicode spaces,
contractions, added-token text, empty and one-character documents)."""

import json
import lzma
import random

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmtrain.data import encode as enc
from llmtrain.data.tokenizer import CORPUS_DIR

PIECES = [
    " ", "  ", "   ", "\n", "\n\n", " \n", "\t", " \t", "\r\n", "\u00a0", " \u00a0", "\u3000", "\u2028",
    "\x1c", "\x0b", "a", "the", " the", "The", "B", "1", "42", " 1234", "'s", "'S", " 're", "'LL",
    "é", "naïve", " über", "😀", " 😀", ",", ".", " (", ")", "--", " —", "<|", "|>", "<|endoftext|>",
    "\ufeff", "x=1;", " \x00", "ä", "中文", " 中",
]  # fmt: skip


def random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = ["", " ", "a", " a", "a ", "  a  ", "\n", "word", " leading", "trailing ", "<|endoftext|>"]
    for _ in range(n):
        docs.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60))))
    with lzma.open(CORPUS_DIR / "kjv.jsonl.xz", "rt") as f:
        docs += [json.loads(next(f))["text"] for _ in range(5)]
    return docs


def trained_tokenizer(style: str) -> Tokenizer:
    """A small byte-level BPE trained on the adversarial text, so whitespace runs have merges."""
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(enc.LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(random_docs(300, seed=1), trainer=trainer)
    return tok


@pytest.fixture(scope="module", params=["shipped", "gpt2", "llama3"])
def tokenizer(request) -> Tokenizer:
    if request.param == "shipped":
        return Tokenizer.from_file(str(CORPUS_DIR / "tokenizer.json"))
    return trained_tokenizer(request.param)


def reference(tok: Tokenizer, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [[*e.ids, eos] if e.ids else [] for e in tok.encode_batch(texts)]
    return np.array([i for d in ids for i in d], np.uint16), np.array([len(d) for d in ids], np.int32)


@pytest.mark.parametrize("max_chunks", [1_000_000, 50])  # 50: the cache is cleared between batches
def test_fast_path_matches_the_tokenizer(tokenizer, max_chunks):
    assert enc.chunkable(json.loads(tokenizer.to_str()))
    encoder = enc.Encoder(tokenizer, 0, np.uint16, fast=True, max_chunks=max_chunks)
    assert encoder.fast
    docs = random_docs(600, seed=0)
    for start in range(0, len(docs), 97):  # several batches: later ones hit the cache
        batch = docs[start : start + 97]
        tokens, lengths, bad = encoder(batch)
        expect_tokens, expect_lengths = reference(tokenizer, batch, 0)
        assert bad == []
        assert np.array_equal(lengths, expect_lengths)
        assert np.array_equal(tokens, expect_tokens)


def test_without_eos_and_lone_surrogates(tokenizer):
    texts = ["In the beginning", "lone \ud800 surrogate", "", "end"]
    for fast in (True, False):
        tokens, lengths, bad = enc.Encoder(tokenizer, None, np.uint16, fast=fast)(texts)
        assert bad == [1] and lengths[1] == 0 and lengths[2] == 0
        ok = [texts[0], texts[3]]
        assert tokens.tolist() == [i for e in tokenizer.encode_batch(ok) for i in e.ids]


def test_not_chunkable_tokenizers_use_the_tokenizer_whole():
    spec = json.loads(Tokenizer.from_file(str(CORPUS_DIR / "tokenizer.json")).to_str())
    assert enc.chunkable(spec)
    assert not enc.chunkable({**spec, "normalizer": {"type": "NFC"}})
    assert not enc.chunkable({**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}})
    assert not enc.chunkable({**spec, "post_processor": {"type": "TemplateProcessing"}})
    assert not enc.chunkable({**spec, "model": {**spec["model"], "type": "WordPiece"}})

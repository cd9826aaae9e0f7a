"""Rebuild the shipped corpus and tokenizer (maintainers only; the results are committed).

    apt-get install bible-kjv && python scripts/make_corpus.py

Writes llmtrain/corpus/kjv.jsonl.xz (one JSON document per chapter, verse numbers stripped) and
llmtrain/corpus/tokenizer.json (byte-level BPE, 4096 tokens, trained on that text).
"""

import json
import lzma
import re
import subprocess
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "llmtrain" / "corpus"
EOS = "<|endoftext|>"


def chapters(raw: str):
    """Split `bible` output into (title, text) chapters; verse numbers removed, lines re-joined."""
    title, verses = None, []
    for line in raw.splitlines():
        if re.fullmatch(r"\S.* \d+", line.strip()) and not line.startswith(" "):
            if title and verses:
                yield title, " ".join(verses)
            title, verses = line.strip(), []
        elif m := re.match(r"\s+\d+ (.*)", line):
            verses.append(m.group(1).strip())
        elif line.strip():
            verses[-1] += " " + line.strip()
    if title and verses:
        yield title, " ".join(verses)


def main() -> None:
    raw = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    docs = [{"title": t, "text": f"{t}\n\n{x}"} for t, x in chapters(raw)]
    OUT.mkdir(parents=True, exist_ok=True)
    with lzma.open(OUT / "kjv.jsonl.xz", "wt", encoding="utf-8", preset=9) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    tok.save(str(OUT / "tokenizer.json"))
    print(f"{len(docs)} documents, vocab {tok.get_vocab_size()}, EOS id {tok.token_to_id(EOS)}")


if __name__ == "__main__":
    main()

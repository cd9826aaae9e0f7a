"""Tokenizer loading: a Hugging Face `tokenizers` tokenizer from a local tokenizer.json or directory.

No download ever happens here: Llama 3 style tokenizers are given by path.
"""

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from llmtrain.errors import ConfigError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
# Tried in order when the tokenizer directory has no tokenizer_config.json naming its EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


def tokenizer_path(spec: str, key: str = "data.tokenizer") -> Path:
    """Resolve `builtin`, a tokenizer.json or a directory holding one; one-line error otherwise."""
    path = CORPUS_DIR / "tokenizer.json" if spec == "builtin" else Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            key, spec, f"no tokenizer at {path}", "a tokenizer.json, a directory holding one, or builtin"
        )
    return path


@lru_cache(maxsize=8)
def _load(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def load_tokenizer(spec: str, key: str = "data.tokenizer") -> Tokenizer:
    path = tokenizer_path(spec, key)
    try:
        return _load(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ConfigError(key, spec, f"not a valid tokenizer.json ({e})") from None


def eos_token(spec: str, override: str | None = None, key: str = "data.tokenizer") -> tuple[str, int]:
    """The end-of-document token and its id: `override`, else tokenizer_config.json's eos_token,
    else the first of EOS_CANDIDATES in the vocabulary."""
    path = tokenizer_path(spec, key)
    tok = load_tokenizer(spec, key)
    names: list[str] = [override] if override else []
    cfg_file = path.parent / "tokenizer_config.json"
    if not override and cfg_file.is_file():
        eos = json.loads(cfg_file.read_text()).get("eos_token")
        if isinstance(eos, dict):  # older transformers configs store an AddedToken dict
            eos = eos.get("content")
        if eos:
            names.append(eos)
    if not override:
        names += EOS_CANDIDATES
    for name in names:
        tid = tok.token_to_id(name)
        if tid is not None:
            return name, tid
    raise ConfigError(key, spec, f"no EOS token among {names} in the vocabulary", "set eos=TOKEN")


def vocab_size(tok: Tokenizer) -> int:
    return tok.get_vocab_size(with_added_tokens=True)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

"""The tokenizer a prepared dataset was made with, checked against data.tokenizer and model.vocab_size.

prepare records it in PREFIX.manifest.json: the sha256 of its tokenizer.json's bytes and its vocab_size.
Training with another tokenizer either indexes past the embedding (ids >= model.vocab_size: a traceback at
step 1) or trains silently on ids that mean other strings. The configured tokenizer is hashed the same way
(the tokenizer.json that `builtin`, a directory or a file path resolves to), so the same file compares
equal however it is named. Data prepared before the manifest recorded a field skips that field's check.
No torch: preflight (config.validate) runs it too, on the light path.
"""

import json
from functools import lru_cache
from pathlib import Path

from llmtrain.data.tokenizer import file_sha256, tokenizer_path
from llmtrain.errors import ConfigError


def recorded_tokenizer(prefix: str) -> dict:
    """The manifest's tokenizer record; {} where there is no manifest, it is unreadable or has no record
    (an unreadable manifest is reported by blend.check_dataset_files, which build_data runs first)."""
    try:
        manifest = json.loads(Path(prefix + ".manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    record = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    return record if isinstance(record, dict) else {}


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a changed file is hashed again
    return file_sha256(Path(path))


def tokenizer_sha256(spec: str, key: str = "data.tokenizer") -> str:
    """sha256 of the tokenizer.json that `spec` names, as prepare records it."""
    path = tokenizer_path(spec, key).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def _name(record: dict) -> str:
    """How data.tokenizer names the recorded tokenizer: builtin for the shipped one, else its path."""
    if record.get("sha256") == tokenizer_sha256("builtin"):
        return "builtin"
    return str(record.get("path") or f"<the tokenizer.json with sha256 {record.get('sha256')}>")


# The parts of a tokenizer.json that decide the token ids of a text (not its post-processor or decoder:
# an HF export adds a post-processor, which prepare never applies).
ID_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def _same_ids(record: dict, tokenizer: str) -> bool:
    """The recorded tokenizer (its file still there) and `tokenizer` map text to the same ids."""
    recorded = "builtin" if _name(record) == "builtin" else record.get("path")
    try:
        a, b = (json.loads(tokenizer_path(str(t)).read_text()) for t in (recorded, tokenizer))
    except (ConfigError, OSError, ValueError, TypeError):
        return False
    return all(a.get(k) == b.get(k) for k in ID_PARTS)


def check_data_tokenizer(prefix: str, tokenizer: str, model_vocab_size: int) -> None:
    """One ConfigError line if `prefix` was prepared with a tokenizer whose ids do not fit the model, or
    with another tokenizer than `tokenizer`."""
    record = recorded_tokenizer(prefix)
    sha, vocab = record.get("sha256"), record.get("vocab_size")
    sha = sha if isinstance(sha, str) and sha else None
    same = sha is None or sha == tokenizer_sha256(tokenizer) or _same_ids(record, tokenizer)
    if isinstance(vocab, int) and vocab > model_vocab_size:
        fix = f"set model.vocab_size>={vocab}"
        if not same:
            fix += f" and data.tokenizer={_name(record)}, or re-prepare {prefix} with tokenizer={tokenizer}"
        raise ConfigError(
            "model.vocab_size",
            model_vocab_size,
            f"{prefix} was prepared with a tokenizer of {vocab} tokens ({_name(record)}), whose ids reach "
            f"past the embedding; {fix}",
        )
    if not same:
        raise ConfigError(
            "data.tokenizer",
            tokenizer,
            f"{prefix} was prepared with another tokenizer ({_name(record)}, sha256 {sha[:12]}; "
            f"data.tokenizer's is {tokenizer_sha256(tokenizer)[:12]}); set data.tokenizer={_name(record)}, "
            f"or re-prepare {prefix} with tokenizer={tokenizer}",
        )

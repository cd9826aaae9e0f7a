"""`python -m llmtrain.data.prepare input=... tokenizer=... output=PREFIX [key=value ...]`

Tokenizes jsonl / json / parquet / txt files (globs, directories, .gz/.xz/.bz2) or a Hugging Face
`datasets` dataset into a Megatron indexed dataset PREFIX.bin + PREFIX.idx, with PREFIX.manifest.json
(sources and their hashes, tokenizer hash, counts, malformed records). Overrides use Hydra's syntax
(`input=[a.jsonl,b.parquet]`). Errors the user can fix print one line and exit with code 2.
Output is byte-identical to Megatron-LM's tools/preprocess_data.py (HuggingFaceTokenizer, --append-eod).
Formats, the malformed-input policy, resume and the manifest: docs/data.md.
"""

import sys
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import MISSING, OmegaConf

from llmtrain.errors import ConfigError, UserError


@dataclass
class PrepareConfig:
    input: Any = MISSING  # file, glob, directory, hf:NAME[:SPLIT], or a list of those
    tokenizer: str = MISSING  # tokenizer.json, a directory holding one, or builtin
    output: str = MISSING  # output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json
    text_key: str = "text"  # field / column holding the document text
    txt_mode: str = "file"  # .txt inputs: one document per file | line | paragraph
    eos: str | None = None  # end-of-document token (default: tokenizer_config.json's, or a known name)
    append_eos: bool = True
    strict: bool = False  # a malformed record is fatal instead of counted and skipped
    overwrite: bool = False  # replace a different dataset already at `output`
    workers: int = 0  # tokenizer processes; 0 = one per core, -1 = threads in this process
    batch_mb: float = 1.0  # text per tokenizer call
    commit_mb: float = 64.0  # output between two resumable commits
    progress: bool = True
    fast: bool = True  # chunked fast path (same ids; only used where it is exact for the tokenizer)


def compose(argv: list[str]) -> PrepareConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    from llmtrain.override_syntax import parse_override

    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            parse_override(arg)  # one line with the quoted form, as the training command gives it
    ConfigStore.instance().store(name="llmtrain_prepare", node=PrepareConfig)
    try:
        with initialize(version_base=None, config_path=None):
            cfg = hydra_compose("llmtrain_prepare", overrides=argv)
    except HydraException as e:
        first = str(e).splitlines()[0]
        if first.startswith("Ambiguous value for argument"):  # a comma: Hydra reads a sweep, not a list
            arg = next((a for a in argv if a in first), "")
            key, _, value = arg.partition("=")
            raise UserError(f"{arg}: a comma makes a sweep; give a list: {key}=[{value}]") from None
        raise UserError(f"{first} (keys: {', '.join(PrepareConfig.__dataclass_fields__)})") from None
    for key in ("input", "tokenizer", "output"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(
                key, "???", "required", "python -m llmtrain.data.prepare input=... tokenizer=... output=..."
            )
    if cfg.workers < -1:
        raise ConfigError("workers", cfg.workers, "must be >= -1 (0 = one process per core, -1 = threads)")
    for key in ("batch_mb", "commit_mb"):
        if not cfg[key] > 0:
            raise ConfigError(key, cfg[key], "must be > 0")
    if cfg.txt_mode not in ("file", "line", "paragraph"):
        raise ConfigError("txt_mode", cfg.txt_mode, "not a valid choice", ["file", "line", "paragraph"])
    out = OmegaConf.to_object(cfg)
    if isinstance(out.input, list | tuple):
        out.input = [str(x) for x in out.input]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        for name, f in PrepareConfig.__dataclass_fields__.items():
            default = "(required)" if f.default is MISSING else repr(f.default)
            print(f"  {name}={default}")
        return 0
    from llmtrain.data.pipeline import PrepareOptions, prepare

    try:
        cfg = compose(argv)
        prepare(PrepareOptions(**asdict(cfg)), log=lambda m: print(m, file=sys.stderr, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The corpora shipped with the package, prepared into the cache on first use.

The output name carries the tokenizer's hash, so another tokenizer gets its own dataset; prepare's file
lock and atomic publish make concurrent first uses (several ranks or runs) safe.
"""

from pathlib import Path

from llmtrain.data.tokenizer import CORPUS_DIR, file_sha256, tokenizer_path
from llmtrain.errors import ConfigError
from llmtrain.fsio import CannotWrite

BUILTIN = {"kjv": CORPUS_DIR / "kjv.jsonl.xz"}


def builtin_prefix(name: str, tokenizer: str, cache_dir: str, log=print) -> str:
    """Path prefix of the prepared built-in corpus `name`, preparing it if needed."""
    if name not in BUILTIN:
        raise ConfigError("data.builtin", name, "unknown built-in corpus", sorted(BUILTIN))
    tok_file = tokenizer_path(tokenizer)
    prefix = Path(cache_dir).expanduser() / "datasets" / f"{name}-{file_sha256(tok_file)[:12]}" / name
    rank0_first = _dist_initialized()
    if rank0_first:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            _prepare(name, tok_file, prefix, log)
        dist.barrier()
    # Without torch.distributed (or with a node-local cache) every process lands here; the file lock
    # inside prepare lets one of them do the work and the others find it done.
    _prepare(name, tok_file, prefix, log)
    return str(prefix)


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _prepare(name: str, tok_file: Path, prefix: Path, log) -> None:
    if Path(f"{prefix}.idx").exists() and Path(f"{prefix}.bin").exists():
        return  # fast path: no tokenizer work, no lock
    from llmtrain.data.pipeline import PrepareOptions, prepare

    log(f"preparing the built-in corpus {name!r} into {prefix}.bin/.idx (first use)")
    # Threads, not processes: this runs inside the trainer, which must not fork.
    opts = PrepareOptions(input=[str(BUILTIN[name])], tokenizer=str(tok_file), output=str(prefix))
    opts.progress, opts.workers = False, -1
    try:
        prepare(opts, log=log)
    except CannotWrite as e:  # prepare's fix names its own output=; here the cache is the config's
        raise e.with_fix("set data.cache_dir=DIR to a writable directory with room for the corpus") from None

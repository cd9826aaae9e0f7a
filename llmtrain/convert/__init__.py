"""Hugging Face interoperability and checkpoint file helpers.

    python -m llmtrain.convert import HF_DIR OUT          # HF Llama -> llmtrain checkpoint (step 0)
    python -m llmtrain.convert import HF_DIR OUT --engine megatron --tp 2   # ... as a Megatron dist checkpoint
    python -m llmtrain.convert export CHECKPOINT OUT      # llmtrain checkpoint -> HF Llama dir
    train.init_from=HF_DIR_OR_CHECKPOINT                   # -> init_weights_from(path, model)

Modules: `io` (llmtrain checkpoint files: locate, manifest, sha256, atomic dirs), `hf` (HF config/names/
shards/tokenizer), `api` (import/export/init_from), `megatron` (Megatron-Core dist checkpoints, read and write).
"""

from llmtrain.convert.api import describe_source, export_hf, import_hf, init_weights_from, load_state
from llmtrain.convert.io import (
    atomic_output_dir,
    load_model_state,
    read_config,
    read_manifest,
    resolve_checkpoint,
    save_model_file,
    sha256_file,
    step_dir_name,
    verify_files,
    write_checkpoint,
    write_manifest,
)

__all__ = [
    "atomic_output_dir",
    "describe_source",
    "export_hf",
    "import_hf",
    "init_weights_from",
    "load_model_state",
    "load_state",
    "read_config",
    "read_manifest",
    "resolve_checkpoint",
    "save_model_file",
    "sha256_file",
    "step_dir_name",
    "verify_files",
    "write_checkpoint",
    "write_manifest",
]

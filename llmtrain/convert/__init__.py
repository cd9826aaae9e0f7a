"""Hugging Face interoperability and checkpoint file helpers.

    python -m llmtrain.convert import HF_DIR OUT          # HF Llama/Qwen3 -> llmtrain checkpoint (step 0)
    python -m llmtrain.convert import HF_DIR OUT --engine megatron --tp 2   # ... as a Megatron dist checkpoint
    python -m llmtrain.convert export CHECKPOINT OUT      # llmtrain checkpoint -> HF dir of its family
    train.init_from=HF_DIR_OR_CHECKPOINT                   # -> init_weights_from(path, model)

Modules: `io` (the torch engine's model.safetensors, model-only checkpoints), `hf` (HF config.json/shards/
tokenizer; names and shapes are the model family's), `megatron` (Megatron-Core dist checkpoints, read and
write), `api` (import/export/init_from, and reading any engine's checkpoint). Imports go one way: api ->
megatron -> hf -> io -> llmtrain.checkpoint_format (the checkpoint layout, manifest, sha256s, `latest`,
validity: finding and verifying a checkpoint is there, as for resume).
"""

from llmtrain.convert.api import (
    describe_source,
    export_hf,
    import_hf,
    init_weights_from,
    load_model_state,
    load_state,
)
from llmtrain.convert.io import save_model_file, write_checkpoint

__all__ = [
    "describe_source",
    "export_hf",
    "import_hf",
    "init_weights_from",
    "load_model_state",
    "load_state",
    "save_model_file",
    "write_checkpoint",
]

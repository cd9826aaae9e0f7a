"""The Llama family: `family.py` (the registry's entry and its formulas), `model.py` (the reference
nn.Module), `hf.py` (Hugging Face adapter), `megatron.py` (Megatron-Core mapping).

`from llmtrain.models.llama import LlamaModel` still works; the model module (torch) loads on first use.
"""

_MODEL_NAMES = {
    "Attention", "DecoderLayer", "LlamaModel", "MLP", "RMSNorm", "apply_rope", "causal_lm_loss", "rope_tables"
}  # fmt: skip


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from llmtrain.models.llama import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

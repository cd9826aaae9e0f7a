"""Hugging Face Qwen3ForCausalLM <-> Qwen3Model: Llama's adapter plus the per-head q/k norms."""

from llmtrain.models.llama.hf import LlamaHF
from llmtrain.models.spec import ModelSpec


class Qwen3HF(LlamaHF):
    family = "qwen3"
    title = "Qwen3"
    config_class = "Qwen3Config"
    architecture = "Qwen3ForCausalLM"
    free_head_dim = True
    BOOL_KEYS = (*LlamaHF.BOOL_KEYS, "use_sliding_window")

    def layer_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        return super().layer_shapes(spec) | {
            "self_attn.q_norm.weight": (spec.head_dim,),
            "self_attn.k_norm.weight": (spec.head_dim,),
        }

    def unsupported(self, raw: dict) -> list[str]:
        problems = super().unsupported(raw)
        if raw.get("use_sliding_window"):
            problems.append("sliding-window attention (llmtrain's Qwen3 attends to the full context)")
        return problems

    def config_kwargs(self, spec: ModelSpec) -> dict:
        kwargs = super().config_kwargs(spec)
        del kwargs["mlp_bias"]  # Qwen3Config has no such key
        return kwargs | {"use_sliding_window": False, "max_window_layers": spec.num_layers}

"""Qwen3 on Megatron-Core: Llama's mapping plus qk_layernorm (TE RMSNorm over head_dim on q and k, before
RoPE, as Megatron's SelfAttention applies it) and an explicit kv_channels (head_dim may differ from
hidden/heads)."""

from typing import ClassVar

from llmtrain.models.llama.megatron import LlamaMegatron
from llmtrain.models.spec import ModelSpec


class Qwen3Megatron(LlamaMegatron):
    LAYER_DIRECT: ClassVar[dict[str, str]] = LlamaMegatron.LAYER_DIRECT | {
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    }
    # One head_dim-wide weight shared by all heads: every TP rank holds all of it.
    TP_DIM: ClassVar[dict[str, int | str | None]] = LlamaMegatron.TP_DIM | {
        "self_attention.q_layernorm.weight": None,
        "self_attention.k_layernorm.weight": None,
    }

    def layer_spec_kwargs(self) -> dict:
        return {"qk_layernorm": True}

    def architecture_kwargs(self, spec: ModelSpec) -> dict:
        return super().architecture_kwargs(spec) | {"qk_layernorm": True}

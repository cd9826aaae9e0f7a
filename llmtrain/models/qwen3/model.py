"""Qwen3 dense in plain PyTorch: LlamaModel whose attention normalizes each query and key head (RMSNorm
over head_dim, one weight shared by all heads) before RoPE, as HF's Qwen3Attention. Parameter names follow
Qwen3ForCausalLM (without the `model.` prefix): `self_attn.q_norm.weight`, `self_attn.k_norm.weight`.
"""

import torch

from llmtrain.models.layers import RMSNorm
from llmtrain.models.llama.model import Attention, LlamaModel
from llmtrain.models.spec import ModelSpec


class Qwen3Attention(Attention):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3Model(LlamaModel):
    attention = Qwen3Attention

"""Llama on Megatron-Core's GPTModel with TE layers: TransformerConfig fields, layer spec, weight layout.

Pure tensor code (no Megatron import). Megatron fuses per layer:
- q/k/v into `self_attention.linear_qkv.weight`, grouped per KV group: for each group g the rows are
  [the q heads of g ; k_g ; v_g] (head i belongs to group i // (heads/groups), as HF's repeat_kv);
- gate/up into `mlp.linear_fc1.weight` = [gate ; up], per TP rank [gate_r ; up_r];
- the RMSNorm weights into the following linear (`linear_qkv.layer_norm_weight`,
  `linear_fc1.layer_norm_weight`).
"""

import re
from typing import ClassVar

import torch
import torch.nn.functional as F

from llmtrain.models.spec import ModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def local_to_global_name(name: str, layer_numbers: list[int]) -> str:
    """`decoder.layers.j.x` of a model chunk -> `decoder.layers.<global index>.x`.

    layer_numbers: the chunk's `layer.layer_number` values (1-based, global), in local order.
    """
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{layer_numbers[int(m.group(1))] - 1}.{m.group(2)}"


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int
) -> torch.Tensor:
    head_dim = q.shape[0] // num_heads
    hidden = q.shape[1]
    per_group = num_heads // num_groups
    q = q.view(num_groups, per_group * head_dim, hidden)
    k = k.view(num_groups, head_dim, hidden)
    v = v.view(num_groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    per_group = num_heads // num_groups
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (num_groups * (per_group + 2))
    grouped = qkv.view(num_groups, (per_group + 2) * head_dim, hidden)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


class LlamaMegatron:
    """The Megatron mapping of a family; subclasses add tensors (LAYER_DIRECT, TP_DIM) and config fields."""

    # Megatron name inside a layer -> reference name inside a layer (one-to-one entries).
    LAYER_DIRECT: ClassVar[dict[str, str]] = {
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }
    GLOBAL_DIRECT: ClassVar[dict[str, str]] = {
        "embedding.word_embeddings.weight": "embed_tokens.weight",
        "decoder.final_layernorm.weight": "norm.weight",
        "output_layer.weight": "lm_head.weight",
    }
    # How each Megatron weight is split over TP ranks: dim 0 (column parallel), dim 1 (row parallel),
    # or replicated (None). linear_fc1 is special: gate and up are split separately.
    TP_DIM: ClassVar[dict[str, int | str | None]] = {
        "embedding.word_embeddings.weight": 0,
        "output_layer.weight": 0,
        "decoder.final_layernorm.weight": None,
        "self_attention.linear_qkv.layer_norm_weight": None,
        "self_attention.linear_qkv.weight": 0,
        "self_attention.linear_proj.weight": 1,
        "mlp.linear_fc1.layer_norm_weight": None,
        "mlp.linear_fc1.weight": "gate_up",
        "mlp.linear_fc2.weight": 1,
    }

    def layer_spec_kwargs(self) -> dict:
        """Arguments of Megatron-Core's get_gpt_layer_with_transformer_engine_spec."""
        return {}

    def architecture_kwargs(self, spec: ModelSpec) -> dict:
        """Llama (RMSNorm, SwiGLU, RoPE, GQA, no biases) as Megatron TransformerConfig fields."""
        return dict(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            ffn_hidden_size=spec.ffn_hidden_size,
            num_attention_heads=spec.num_attention_heads,
            num_query_groups=spec.num_query_groups,
            kv_channels=spec.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=spec.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            bias_activation_fusion=True,  # fused SwiGLU
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=spec.init_std,  # output projections get std/sqrt(2L), as the torch model
        )

    def to_megatron(self, ref: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Full (unsharded) Megatron state dict, global layer indices, from a reference state dict."""
        out = {mg: ref[r] for mg, r in self.GLOBAL_DIRECT.items() if r in ref}
        if spec.tie_embeddings:
            out.pop("output_layer.weight", None)
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            for mg, r in self.LAYER_DIRECT.items():
                out[f"decoder.layers.{i}.{mg}"] = ref[p + r]
            out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = fuse_qkv(
                ref[p + "self_attn.q_proj.weight"],
                ref[p + "self_attn.k_proj.weight"],
                ref[p + "self_attn.v_proj.weight"],
                spec.num_attention_heads,
                spec.num_query_groups,
            )
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = fuse_gate_up(
                ref[p + "mlp.gate_proj.weight"], ref[p + "mlp.up_proj.weight"]
            )
        return out

    def to_reference(self, mg: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Inverse of to_megatron (full tensors). lm_head is the embedding when tied."""
        out = {r: mg[m] for m, r in self.GLOBAL_DIRECT.items() if m in mg}
        if spec.tie_embeddings:
            out["lm_head.weight"] = out["embed_tokens.weight"]
        for i in range(spec.num_layers):
            p, m = f"layers.{i}.", f"decoder.layers.{i}."
            for mgn, r in self.LAYER_DIRECT.items():
                out[p + r] = mg[m + mgn]
            q, k, v = split_qkv(
                mg[m + "self_attention.linear_qkv.weight"], spec.num_attention_heads, spec.num_query_groups
            )
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
            out[p + "self_attn.v_proj.weight"] = v
            gate, up = split_gate_up(mg[m + "mlp.linear_fc1.weight"])
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        return out

    def tp_shard(self, name: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
        """The slice of a full Megatron weight that TP rank `tp_rank` holds."""
        m = _LAYER.match(name)
        key = m.group(2) if m else name
        if key not in self.TP_DIM:
            raise KeyError(f"no TP layout known for {name}")
        dim = self.TP_DIM[key]
        if tp_size == 1 or dim is None:
            return full
        if dim == "gate_up":
            gate, up = split_gate_up(full)
            return fuse_gate_up(gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank])
        return full.chunk(tp_size, dim)[tp_rank]

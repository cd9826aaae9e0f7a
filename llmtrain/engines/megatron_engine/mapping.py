"""Weights between the torch reference model and Megatron-Core's GPTModel: the family's mapping.

The layout itself (fused QKV per KV group, fused [gate; up] fc1, norms fused into TE linears, TP splits)
lives with each model family (llmtrain/models/<family>/megatron.py); these are the engine's entry points.
"""

import torch

from llmtrain.models import ModelSpec, get_family
from llmtrain.models.llama.megatron import (  # noqa: F401 (the engine's and tests' names)
    fuse_gate_up,
    fuse_qkv,
    local_to_global_name,
    split_gate_up,
    split_qkv,
)


def reference_to_megatron(ref: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Full (unsharded) Megatron state dict, global layer indices, from a reference state dict."""
    return spec.model_family.megatron.to_megatron(ref, spec)


def megatron_to_reference(mg: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Inverse of reference_to_megatron (full tensors). lm_head is the embedding when tied."""
    return spec.model_family.megatron.to_reference(mg, spec)


def tp_shard(
    name: str, full: torch.Tensor, tp_size: int, tp_rank: int, family: str = "llama"
) -> torch.Tensor:
    """The slice of a full Megatron weight that TP rank `tp_rank` holds."""
    return get_family(family).megatron.tp_shard(name, full, tp_size, tp_rank)

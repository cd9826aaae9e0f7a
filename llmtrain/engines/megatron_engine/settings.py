"""Translate llmtrain's config groups into Megatron-Core / TE settings (plain dicts, no Megatron import).

Kept free of Megatron and TE imports so the CPU suite can check the translation and its errors. The
precision fields come ready from the precision layer (llmtrain/precision/te_recipes.py): no format here.
"""

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.layout import check_layout as resolve_layout  # noqa: F401 (one check, shared with preflight)
from llmtrain.errors import ConfigError
from llmtrain.models import ModelSpec

# Distributed-optimizer checkpoint format: reshardable across DP sizes, fully parallel save/load.
CKPT_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def transformer_config_kwargs(spec: ModelSpec, parallel, layout: Layout, precision_kwargs: dict) -> dict:
    """TransformerConfig fields: the model family's architecture, then numerics, parallelism, precision."""
    kwargs = spec.model_family.megatron.architecture_kwargs(spec)
    kwargs.update(
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        apply_rope_fusion=True,
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="native",
        # Loss = sum over tokens / tokens in the global batch, so loss masks weigh tokens equally.
        calculate_per_token_loss=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        gradient_accumulation_fusion=bool(parallel.grad_accum_fusion),
        deallocate_pipeline_outputs=layout.pp > 1,
    )
    if parallel.recompute == "selective":
        kwargs.update(recompute_granularity="selective")  # core attention only (Megatron's default set)
    elif parallel.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(precision_kwargs)
    return kwargs


def ddp_config_kwargs(parallel) -> dict:
    return dict(
        grad_reduce_in_fp32=True,  # FP32 main grads, as Megatron-Bridge's bf16_mixed
        overlap_grad_reduce=bool(parallel.overlap_grad_reduce),
        overlap_param_gather=bool(parallel.overlap_param_gather),
        use_distributed_optimizer=bool(parallel.distributed_optimizer),
    )


def optimizer_config_kwargs(optim, parallel) -> dict:
    if optim.name != "adamw":
        raise ConfigError("optim.name", optim.name, "the Megatron engine supports AdamW only", ["adamw"])
    return dict(
        optimizer="adam",  # decoupled weight decay by default, i.e. AdamW
        lr=float(optim.lr),
        min_lr=float(optim.min_lr),
        weight_decay=float(optim.weight_decay),
        adam_beta1=float(optim.beta1),
        adam_beta2=float(optim.beta2),
        adam_eps=float(optim.eps),
        clip_grad=float(optim.clip_grad),
        bf16=True,
        params_dtype=torch.bfloat16,
        # A constant scale of 1 changes no numbers but turns on Megatron's inf/NaN check, so a
        # non-finite gradient skips the update instead of corrupting the weights.
        loss_scale=1.0,
        use_distributed_optimizer=bool(parallel.distributed_optimizer),
        overlap_param_gather=bool(parallel.overlap_param_gather),
    )


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """What Megatron's OptimizerParamScheduler does each step, with the loop's LR."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_mult", 1.0)
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
        # Megatron keeps 1-D params (norms) out of weight decay through wd_mult=0.
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)

"""Low-precision parameter all-gather: Megatron-Bridge's fp8_param_gather / fp4_param_gather.

Bridge's quantized recipes keep the quantized layers' parameters in their low-precision format (TE creates
them under fp8_model_init; TransformerConfig.fp8_param / fp4_param), and the distributed optimizer
quantizes its FP32 master shard into them and all-gathers the low-precision bytes (1 or ~0.56 bytes per
parameter instead of 2); no BF16 copy of those weights is kept. Which named recipes do it, and their
fields, come from the precision layer (precision/recipes.py: TENative.param_gather).

It needs TE's native recipe (TE's quantized parameter classes): llmtrain's emulated formats (our quantizers
inside TE's CustomRecipe) cannot use it. Kept free of Megatron/TE imports.
"""

from llmtrain.errors import UserError
from llmtrain.precision.te_recipes import keeps_bf16_params, lowp_param_gather_kwargs, resolve_backend


def why_not(parallel, prec, capability: tuple[int, int]) -> str | None:
    """Why the low-precision all-gather cannot run for this config on this GPU (None: it can)."""
    if keeps_bf16_params(prec):
        return f"precision={prec.name} keeps BF16 parameters"
    if not parallel.distributed_optimizer:
        return "it needs parallel.distributed_optimizer=true (Megatron gathers parameters only there)"
    backend, why = resolve_backend(prec, capability)
    if backend != "native":
        return f"precision={prec.name} runs emulated here ({why or 'precision.backend=custom'}); TE keeps low-precision parameters only for its native recipes"
    return None


def resolve(parallel, prec, capability: tuple[int, int], shards: int) -> bool:
    """parallel.lowp_param_gather: null = on where it can run and there is something to gather (`shards`,
    the distributed optimizer's dp*cp, > 1); true where it cannot run is one error line.

    Off by default on one shard, where Bridge's recipes still turn it on: nothing is all-gathered there, so
    it saves no communication, and on one H100 at 1B (docs/benchmarks.md) TE's cast of the FP32 master
    weights into the FP8 parameters took 68 ms of a 0.78 s FP8-CS step (64 cast-transpose kernels of ~1 ms).
    """
    want = parallel.get("lowp_param_gather")
    why = why_not(parallel, prec, capability)
    if want is None:
        return why is None and shards > 1
    if want and why:
        raise UserError(
            f"parallel.lowp_param_gather=true: {why}; set parallel.lowp_param_gather=false, or null for auto"
        )
    return bool(want)


def megatron_kwargs(prec, on: bool) -> tuple[dict, dict, dict]:
    """(TransformerConfig, DistributedDataParallelConfig, OptimizerConfig) fields, as Bridge sets them."""
    if not on:
        return {}, {}, {}
    return lowp_param_gather_kwargs(prec)  # the named recipe's (precision/recipes.py)

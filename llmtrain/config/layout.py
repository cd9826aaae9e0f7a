"""The one check of a parallel layout against the model and the world size.

Preflight (config/validate.py, hence `dry_run`) and the Megatron engine's build both call `check_layout`, so
a layout the dry run accepts is one the engine builds. No torch or Megatron import: the CPU suite and the
dry run use it as they are.
"""

from dataclasses import dataclass

from llmtrain.errors import ConfigError

RECOMPUTE = ["none", "selective", "full"]


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    sequence_parallel: bool
    # Micro-batches per optimizer step on each DP rank, for the memory estimate's 1F1B in-flight count
    # (config/estimate.layout_of fills it; the engine counts its own from the batch).
    grad_accum: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


def _divisible(key: str, value: int, by_key: str, by: int, fix: str) -> None:
    if by <= 0 or value % by:
        raise ConfigError(key, value, f"must be divisible by {by_key}={by}; {fix}")


def check_layout(parallel, model, world_size: int, engine: str = "megatron") -> Layout:
    """`parallel` (the config group) on `model` (the model config or a ModelSpec: heads, KV groups, layers,
    vocabulary, sequence length) over `world_size` ranks for `engine`; dp=0 takes what is left. One
    ConfigError naming the key and the fix for the first problem."""
    tp, pp, vpp, cp = (int(parallel[k]) for k in ("tp", "pp", "vpp", "cp"))
    for key, value in (("tp", tp), ("pp", pp), ("vpp", vpp), ("cp", cp)):
        if value <= 0:
            raise ConfigError(f"parallel.{key}", value, "must be > 0")
    if parallel.recompute not in RECOMPUTE:
        raise ConfigError("parallel.recompute", parallel.recompute, "not a valid choice", RECOMPUTE)
    if engine == "torch" and (tp, pp, cp) != (1, 1, 1):
        raise ConfigError(
            "parallel",
            f"tp={tp},pp={pp},cp={cp}",
            "the torch engine is data parallel only; use engine=megatron",
            ["tp=1,pp=1,cp=1"],
        )
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            "parallel",
            f"tp={tp},pp={pp},cp={cp}",
            f"tp*pp*cp={model_parallel} must divide the world size {world_size} (cluster.nodes x "
            "cluster.gpus_per_node, or torchrun's --nnodes x --nproc-per-node); raise it or lower tp/pp/cp",
        )
    dp = int(parallel.dp) or world_size // model_parallel
    if dp * model_parallel != world_size:
        raise ConfigError(
            "parallel.dp",
            parallel.dp,
            f"tp*pp*cp*dp must equal the world size {world_size}",
            [world_size // model_parallel, 0],
        )
    _divisible("model.num_attention_heads", model.num_attention_heads, "parallel.tp", tp, "lower parallel.tp")
    _divisible("model.num_query_groups", model.num_query_groups, "parallel.tp", tp, "lower parallel.tp")
    # Megatron splits the embedding and output layer by vocabulary rows over TP ranks; we do not pad.
    _divisible(
        "model.vocab_size", model.vocab_size, "parallel.tp", tp, "pad the vocabulary or lower parallel.tp"
    )
    _divisible(
        "model.num_layers",
        model.num_layers,
        "parallel.pp*vpp",
        pp * vpp,
        "pick pp and vpp whose product divides the layer count",
    )
    if vpp > 1 and pp == 1:
        raise ConfigError("parallel.vpp", vpp, "virtual stages need pipeline parallelism (parallel.pp > 1)")
    if cp > 1:
        _divisible(
            "model.seq_length",
            model.seq_length,
            "2*parallel.cp",
            2 * cp,
            "context parallel splits 2*cp chunks",
        )
    sp = bool(parallel.sequence_parallel)
    if sp and tp == 1:
        raise ConfigError("parallel.sequence_parallel", True, "needs parallel.tp > 1")
    if sp and (model.seq_length // cp) % tp:
        raise ConfigError(
            "parallel.sequence_parallel",
            True,
            f"parallel.tp={tp} must divide the sequence length per CP rank "
            f"(model.seq_length / parallel.cp = {model.seq_length // cp}); change seq_length or tp",
        )
    if parallel.overlap_param_gather and not parallel.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather", True, "needs parallel.distributed_optimizer=true")
    return Layout(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sequence_parallel=sp)

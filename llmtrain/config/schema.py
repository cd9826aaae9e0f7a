"""Typed schema of the whole config tree, registered in Hydra's ConfigStore.

Every group YAML is merged onto these dataclasses, so an unknown key or a wrong type fails at
composition time (cli.py turns that into one line).
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from llmtrain.precision.config import PrecisionConfig


@dataclass
class ModelConfig:
    name: str = "tiny"
    family: str = "llama"  # llama | qwen3: the model family (llmtrain/models/<family>/, models/registry.py)
    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_attention_heads: int = 8
    num_query_groups: int = 4  # KV heads (GQA)
    head_dim: int | None = None  # null = hidden_size / num_attention_heads (Qwen3 may set its own)
    vocab_size: int = 4096
    seq_length: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    cp: int = 1
    dp: int = 0  # 0 = whatever is left of the world size
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full
    grad_accum_fusion: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Keep the quantized layers' parameters in FP8/NVFP4 for the distributed optimizer's all-gather
    # (Megatron-Bridge's fp8_param_gather / fp4_param_gather). null = on where Bridge turns it on and TE
    # runs the recipe natively on this GPU (engines/megatron_engine/param_gather.py).
    lowp_param_gather: bool | None = None


@dataclass
class DataConfig:
    # Megatron-style blend: [prefix] or [w1, prefix1, w2, prefix2, ...] of datasets written by
    # `python -m llmtrain.data.prepare`; empty = the built-in corpus.
    paths: list[Any] = field(default_factory=list)
    builtin: str = "kjv"  # corpus shipped with the package, prepared into cache_dir on first use
    tokenizer: str = "builtin"  # path to tokenizer.json / directory, or "builtin" for the shipped BPE
    eos: str | None = None  # end-of-document token; None = tokenizer_config.json's or a known name
    split: str = "949,50,1"  # train,valid,test weights (by document, as in Megatron)
    cache_dir: str = "~/.cache/llmtrain"  # prepared built-in corpora (and index caches by default)
    index_cache_dir: str | None = None  # Megatron's sample/shuffle index caches; None = cache_dir/index
    eod_mask_loss: bool = False  # no loss on predicting the token after an end-of-document
    mock: bool = False  # Megatron's MockGPTDataset (synthetic tokens): for engine benchmarks
    num_workers: int = 0
    seed: int | None = (
        None  # sample order; None = train.seed (set it to vary init/SR seeds on the same order)
    )


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 2000
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying


@dataclass
class NanPolicy:
    max_skips: int = 3  # non-finite losses/grads skipped (with a warning) before the run stops


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 512
    micro_batch_size: int = 1
    seed: int = 1234
    checkpoint_interval: int = 500
    keep_last: int = 3
    # Write checkpoints in the background after a host-memory snapshot (docs/checkpointing in README).
    # Off by default, as in Megatron-LM and torchtitan: the snapshot holds a second copy of the model and
    # optimizer state in host RAM while it is written.
    checkpoint_async: bool = False
    eval_interval: int = 250
    eval_steps: int = 10
    eval_bf16: bool = True  # quantized precisions: also val_loss_bf16, the same weights with a BF16 forward
    resume: str = "auto"  # auto | never | PATH
    init_from: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    check_memory: bool = True  # refuse runs whose memory estimate exceeds this machine
    nan: NanPolicy = field(default_factory=NanPolicy)


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "llmtrain"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    interval: int = 1
    console: str = "rich"  # rich | plain
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    type: str = "local"  # local | slurm (python -m llmtrain submits with sbatch and returns; docs/slurm.md)
    nodes: int = 1
    gpus_per_node: int = 1  # one rank per GPU; with train.device=cpu: ranks per node, no GPUs requested
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None  # pyxis/enroot image for srun --container-image
    requeue_limit: int = 10  # warning-signal requeues before a job just checkpoints and stops
    signal_seconds: int = 120  # --signal=B:USR1@N: warning this long before the time limit
    extra_sbatch: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--exclusive"]
    job_name: str | None = None  # default llmtrain-<model name>; sweep points add -<index>
    # Shell lines run in the batch script before training (e.g. "module load cuda/12.8", "source env.sh").
    setup: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # NAME=value for every rank, e.g. NCCL_DEBUG=WARN
    python: str | None = None  # interpreter in the job; default: this one, or `python` in a container
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts, e.g. /data:/data
    container_env: list[str] = field(default_factory=list)  # pyxis --container-env: these override the image
    exclusive: bool | None = None  # --exclusive and --mem=0; null: on for multi-node GPU jobs
    cpu_bind: str | None = None  # srun --cpu-bind (e.g. cores); null: SLURM's default
    preview: bool = False  # with dry_run=true: also print the generated sbatch script
    # Memory of one GPU of the planned machines (GiB): the dry run's fit verdict and a submission's memory
    # check (submitting checks against this, not the login node). 80: H100; H200 ~139, B200 ~178.
    gpu_memory_gib: float = 80.0


@dataclass
class EngineConfig:
    name: str = "auto"  # auto | torch | megatron


@dataclass
class MeasureConfig:
    """dry_run=measure: one rank of the planned world, built and stepped for real on this GPU."""

    rank: int = 0  # global rank to emulate; -1 = the last one (last pipeline stage, holds the output layer)
    steps: int = 3  # optimizer steps; the peak of the last one is reported
    micro_batches: int = 0  # per step; 0 = enough to fill the pipeline (min(grad-accum, 2*pp), at least 2)
    json: str | None = None  # also append the result as one JSON line to this file


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    dry_run: Any = False  # false | true (estimate) | measure (llmtrain/engines/megatron_engine/measure.py)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("precision", PrecisionConfig),
        ("parallel", ParallelConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("logging", LoggingConfig),
        ("cluster", ClusterConfig),
        ("engine", EngineConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)

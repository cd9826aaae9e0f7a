"""Whole-tree validation: every user error becomes one ConfigError naming key, value and the allowed values."""

from pathlib import Path

from llmtrain import precision
from llmtrain.config.layout import check_layout
from llmtrain.engines.select import ENGINES
from llmtrain.errors import ConfigError
from llmtrain.launch.launcher import LAUNCHERS
from llmtrain.models.registry import FAMILIES, get_family
from llmtrain.precision.nvfp4_options import emulated_refusal
from llmtrain.train.schedule import SCHEDULES

WANDB_MODES = ["offline", "online", "disabled"]
CONSOLES = ["rich", "plain"]
CLUSTERS = list(LAUNCHERS)  # cluster.type: one launcher each (llmtrain/launch/launcher.py)
DEVICES = ["auto", "cpu", "cuda"]


def _choice(key: str, value, allowed: list) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "not a valid choice", allowed)


def _positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(key, value, "must be > 0")


def _at_least(key: str, value, low, why: str = "") -> None:
    if value is None or value < low:
        raise ConfigError(key, value, f"must be >= {low}" + (f" ({why})" if why else ""))


def _within(key: str, value, low, high, *, high_open: bool = False) -> None:
    ok = value is not None and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(key, value, f"must be in [{low}, {high}{')' if high_open else ']'}")


def _divides(key: str, value: int, by_key: str, by: int, fix: str) -> None:
    if by <= 0 or value % by:
        raise ConfigError(key, value, f"must be divisible by {by_key}={by}; {fix}")


def validate_model(m) -> None:
    _choice("model.family", m.family, sorted(FAMILIES))
    for key in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "vocab_size",
        "seq_length",
    ):
        _positive(f"model.{key}", m[key])
    if m.get("head_dim") is None:  # head_dim = hidden_size / heads
        _divides(
            "model.hidden_size",
            m.hidden_size,
            "model.num_attention_heads",
            m.num_attention_heads,
            "pick a hidden size that is a multiple of the head count",
        )
    _divides(
        "model.num_attention_heads",
        m.num_attention_heads,
        "model.num_query_groups",
        m.num_query_groups,
        "GQA needs whole query groups",
    )
    if m.get("head_dim") is None and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError("model.hidden_size", m.hidden_size, "head dimension must be even for RoPE")
    get_family(m.family).validate(m)  # the family's own rules (e.g. Llama: no head_dim of its own)
    for key in ("rope_theta", "norm_eps", "init_std"):
        _positive(f"model.{key}", m[key])


def validate_split(split) -> None:
    """Megatron's form: up to three non-negative weights, comma-separated (train,valid,test)."""
    fix = "e.g. \"data.split='949,50,1'\""
    try:
        weights = [float(w) for w in str(split).split(",")]
    except ValueError:
        raise ConfigError("data.split", split, f"not comma-separated numbers; {fix}") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ConfigError(
            "data.split", split, f"needs 1-3 weights >= 0 (train,valid,test) with train > 0; {fix}"
        )


def validate_train(t, logging_cfg) -> None:
    _positive("train.steps", t.steps)
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _choice("train.device", t.device, DEVICES)
    _within("train.seed", t.seed, 0, 2**32, high_open=True)  # numpy (Megatron's shuffle) takes no more
    _at_least("train.checkpoint_interval", t.checkpoint_interval, 0, "0 = only at the end and on a stop")
    _at_least("train.keep_last", t.keep_last, 0, "0 = keep every checkpoint")
    _at_least("train.eval_interval", t.eval_interval, 0, "0 = no evaluation")
    if t.eval_interval > 0:
        _positive("train.eval_steps", t.eval_steps)
    _at_least("train.nan.max_skips", t.nan.max_skips, 0)
    _positive("logging.interval", logging_cfg.interval)


def validate_optim(o, steps: int) -> None:
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("optim.name", o.name, ["adamw"])
    _positive("optim.lr", o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError("optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _within("optim.beta1", o.beta1, 0, 1, high_open=True)
    _within("optim.beta2", o.beta2, 0, 1, high_open=True)
    _positive("optim.eps", o.eps)
    _at_least("optim.clip_grad", o.clip_grad, 0, "0 = no clipping")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _within("optim.decay_fraction", o.decay_fraction, 0, 1)


def validate_cluster(c) -> None:
    _positive("cluster.gpu_memory_gib", c.gpu_memory_gib)
    _choice("cluster.type", c.type, CLUSTERS)
    _positive("cluster.nodes", c.nodes)
    _positive("cluster.gpus_per_node", c.gpus_per_node)
    if c.cpus_per_task is not None:
        _positive("cluster.cpus_per_task", c.cpus_per_task)
    _at_least("cluster.requeue_limit", c.requeue_limit, 0)
    _at_least("cluster.signal_seconds", c.signal_seconds, 0)


def validate_parallel(cfg, world: int, engine: str) -> None:
    t = cfg.train
    dp = check_layout(cfg.parallel, cfg.model, world, engine).dp  # the Megatron engine's build runs it too
    _positive("train.micro_batch_size", t.micro_batch_size)
    _divides(
        "train.global_batch_size",
        t.global_batch_size,
        "micro_batch_size*dp",
        t.micro_batch_size * dp,
        f"use a multiple of {t.micro_batch_size * dp}",
    )


def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def validate_data(d, model_vocab_size: int, check_files: bool = True) -> None:
    """check_files=False (a dry run: a plan, possibly for another machine's files) skips what reads the disk."""
    if d.get("seed") is not None:
        _within("data.seed", d.seed, 0, 2**32, high_open=True)  # numpy (Megatron's shuffle) takes no more
    paths = [str(p) for p in d.paths]
    weighted = len(paths) > 1 and _is_number(paths[0])  # else a list of prefixes, as parse_blend reads it
    if weighted and len(paths) % 2:
        raise ConfigError("data.paths", paths, "a blend is [weight1, prefix1, weight2, prefix2, ...]")
    prefixes = paths[1::2] if weighted else paths
    if not check_files:
        return
    if not d.get("mock", False):  # else the run fails at data build, after the run dir was written
        from llmtrain.data.builtin import BUILTIN
        from llmtrain.data.tokenizer import tokenizer_path

        tokenizer_path(d.tokenizer)
        if not prefixes and d.builtin not in BUILTIN:
            raise ConfigError("data.builtin", d.builtin, "unknown built-in corpus", sorted(BUILTIN))
    for prefix in prefixes:
        base = Path(str(prefix)).expanduser()
        for suffix in (".bin", ".idx"):
            if not base.with_name(base.name + suffix).is_file():
                raise ConfigError(
                    "data.paths",
                    str(prefix),
                    f"{base}{suffix} not found; build it with python -m llmtrain.data.prepare",
                )
    if not d.get("mock", False):  # the manifest's tokenizer record: a small JSON per prefix
        from llmtrain.data.provenance import check_data_tokenizer

        for prefix in prefixes:
            base = str(Path(prefix).expanduser()).removesuffix(".bin").removesuffix(".idx")
            check_data_tokenizer(base, d.tokenizer, model_vocab_size)


DRY_RUN_VALUES = [False, True, "measure"]


def check_dry_run_value(value) -> None:
    if value not in DRY_RUN_VALUES:
        raise ConfigError("dry_run", value, "not a valid choice", DRY_RUN_VALUES)


def validate(cfg, *, world: int, engine: str) -> None:
    _choice("engine.name", cfg.engine.name, ENGINES)
    check_dry_run_value(cfg.dry_run)
    validate_model(cfg.model)
    stages = int(cfg.parallel.pp) if engine == "megatron" and int(cfg.parallel.pp) > 0 else 1
    precision.validate(
        cfg.precision, num_layers=cfg.model.num_layers, pipeline_stages=stages
    )  # its own rules
    t, m = cfg.train, cfg.model
    validate_train(t, cfg.logging)
    if t.resume not in ("auto", "never") and not Path(t.resume).expanduser().exists():
        raise ConfigError(
            "train.resume", t.resume, "checkpoint path does not exist", ["auto", "never", "PATH"]
        )
    if t.init_from and not Path(str(t.init_from)).expanduser().exists():  # else each sweep job fails late
        raise ConfigError(
            "train.init_from",
            t.init_from,
            "path does not exist; give an HF model directory, or a run dir, its checkpoints/ or a step_* dir",
        )
    o = cfg.optim
    validate_optim(o, t.steps)
    if cfg.precision.name != "bf16":  # triggers against train.steps, the batch and the LR schedule
        tokens_per_step = t.global_batch_size * m.seq_length
        precision.validate_schedule(cfg.precision, precision.RunShape(t.steps, tokens_per_step, o))
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _choice("logging.console", cfg.logging.console, CONSOLES)
    validate_cluster(cfg.cluster)
    validate_parallel(cfg, world, engine)
    if engine == "megatron" and cfg.precision.backend == "custom":  # emulated for sure: no GPU check needed
        why = emulated_refusal(cfg.precision)
        if why:
            raise ConfigError("precision.backend", "custom", why)
    if engine == "megatron" and cfg.precision.backend == "native" and cfg.precision.name != "bf16":
        # What no GPU can change (no TE recipe, a key TE fixes, the monitor); the compute capability is
        # checked where the GPU is known, at engine build.
        from llmtrain.precision.te_recipes import native_mismatch

        if why := native_mismatch(cfg.precision, capability=(99, 99)):
            raise ConfigError("precision.backend", "native", f"{why}; use precision.backend=custom or auto")
    validate_split(cfg.data.split)
    _at_least("data.num_workers", cfg.data.num_workers, 0)
    validate_data(cfg.data, cfg.model.vocab_size, check_files=not cfg.dry_run)

"""`dry_run=true`: what a recipe costs before it runs (parameters, FLOPs, memory, batch arithmetic)."""

from llmtrain.config.estimate import GIB, estimate_memory, layout_of, lowp_param_gather_planned
from llmtrain.config.validate import check_dry_run_value
from llmtrain.models import ModelSpec

# Native FP8-CS vs BF16 on the Megatron engine, measured on one H200 (docs/benchmarks.md): slower at hidden
# size 2048 (llama3_1b, seq 1024 x MBS 4), faster at 4096 (the 8B proxy, seq 8192); between: not measured.
FP8_SLOWER_MAX_HIDDEN = 2048


def fp8_speed_warning(cfg, engine: str) -> str | None:
    """A warning line when native FP8-CS runs a model in the size range where it was measured slower."""
    prec = cfg.precision
    if engine != "megatron" or prec.name != "fp8_cs" or prec.backend not in ("auto", "native"):
        return None
    hidden = int(cfg.model.hidden_size)
    if hidden > FP8_SLOWER_MAX_HIDDEN:
        return None
    return (
        f"warning      FP8-CS was measured slower than BF16 at this size (hidden_size {hidden} <= "
        f"{FP8_SLOWER_MAX_HIDDEN}): on one H200, llama3_1b (hidden 2048, 4,096 tokens per micro-batch) ran "
        "39-42k tokens/s in FP8-CS vs 48.2k in BF16, while the 8B proxy (hidden 4096) ran FP8-CS 1.19x faster "
        "(docs/benchmarks.md); precision=bf16 is likely faster here"
    )


def dry_run_report(cfg, world: int, engine: str) -> str:
    check_dry_run_value(cfg.dry_run)
    if cfg.dry_run == "measure":  # one rank built and stepped for real under a fake process group
        from llmtrain.engines.megatron_engine.measure import measure_report

        return measure_report(cfg, world, engine)
    spec = ModelSpec.from_config(cfg.model)
    lay = layout_of(cfg, world)
    mem = estimate_memory(cfg, lay, engine)
    t = cfg.train
    tokens_per_step = t.global_batch_size * spec.seq_length
    flops_per_step = spec.flops_per_token() * tokens_per_step
    unit = "GPU" if engine == "megatron" else "process"
    lines = [
        f"model        {spec.name}: {spec.num_params() / 1e9:.3f} B parameters ({spec.num_params():,})",
        f"FLOPs/token  {spec.flops_per_token() / 1e9:.2f} GFLOP (training: 6*N_matmul + 12*L*A*S, A = heads*head_dim)",
        f"precision    {cfg.precision.name} (bf16 layers: first {cfg.precision.bf16_layers.first}, "
        f"last {cfg.precision.bf16_layers.last})",
        f"engine       {engine}; world {world} = tp {lay.tp} x pp {lay.pp} (vpp {lay.vpp}) x cp {lay.cp} "
        f"x dp {lay.dp}; distributed optimizer {'on' if cfg.parallel.distributed_optimizer else 'off'}, "
        f"recompute {cfg.parallel.recompute}, low-precision param all-gather "
        f"{'on' if lowp_param_gather_planned(cfg, lay.dp * lay.cp) else 'off'}",
        f"batch        global {t.global_batch_size} = micro {t.micro_batch_size} x dp {lay.dp} x grad-accum "
        f"{lay.grad_accum}; {tokens_per_step:,} tokens/step (seq {spec.seq_length}); "
        f"{t.steps:,} steps = {t.steps * tokens_per_step / 1e9:.2f} B tokens",
        f"{'memory/' + unit:<12} {mem.line()}",
        f"compute      {flops_per_step / 1e15:.2f} PFLOP/step",
    ]
    if engine == "megatron":
        gib = float(cfg.cluster.gpu_memory_gib)
        verdict = "fits" if mem.total / GIB <= gib * 0.9 else "does NOT fit"
        hint = (
            ""
            if verdict == "fits"
            else (
                "; try more GPUs (cluster.nodes/gpus_per_node) with the distributed optimizer, parallel.cp=2 "
                "for long sequences, parallel.tp/pp, or parallel.recompute=full"
            )
        )
        lines.append(f"fit          {verdict} a {gib:.0f} GiB GPU (cluster.gpu_memory_gib, 90% budget){hint}")
    if warning := fp8_speed_warning(cfg, engine):
        lines.append(warning)
    if note := local_engine_note(cfg, engine):
        lines.append(note)
    return "\n".join(lines)


def local_engine_note(cfg, engine: str) -> str | None:
    """engine=auto dry runs describe the GPU path; say so where a run on this machine would take another."""
    from llmtrain.engines.select import megatron_available

    if (
        cfg.engine.name != "auto"
        or engine != "megatron"
        or cfg.cluster.type != "local"
        or megatron_available()
    ):
        return None
    return (
        "note         engine=auto: this plan is the GPU (Megatron) path; this machine has no CUDA + "
        "Megatron-Core + Transformer Engine, so a run here takes the torch engine (engine=torch dry_run=true "
        "shows that plan)"
    )

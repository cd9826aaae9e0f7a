"""`dry_run=true`: what a recipe costs before it runs (parameters, FLOPs, memory, batch arithmetic)."""

from llmtrain.config.estimate import GIB, estimate_memory, layout_of, lowp_param_gather_planned
from llmtrain.models import ModelSpec

REFERENCE_GPU = ("H100", 80.0)


def dry_run_report(cfg, world: int, engine: str) -> str:
    from llmtrain.engines.megatron_engine.measure import check_dry_run_value, measure_report

    check_dry_run_value(cfg.dry_run)
    if cfg.dry_run == "measure":  # one rank built and stepped for real under a fake process group
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
        f"FLOPs/token  {spec.flops_per_token() / 1e9:.2f} GFLOP (training: 6*N_matmul + 12*L*H*S)",
        f"precision    {cfg.precision.name} (bf16 layers: first {cfg.precision.bf16_layers.first}, "
        f"last {cfg.precision.bf16_layers.last})",
        f"engine       {engine}; world {lay.world} = tp {lay.tp} x pp {lay.pp} (vpp {lay.vpp}) x cp {lay.cp} "
        f"x dp {lay.dp}; distributed optimizer {'on' if cfg.parallel.distributed_optimizer else 'off'}, "
        f"recompute {cfg.parallel.recompute}, low-precision param all-gather "
        f"{'on' if lowp_param_gather_planned(cfg) else 'off'}",
        f"batch        global {t.global_batch_size} = micro {t.micro_batch_size} x dp {lay.dp} x grad-accum "
        f"{lay.grad_accum}; {tokens_per_step:,} tokens/step (seq {spec.seq_length}); "
        f"{t.steps:,} steps = {t.steps * tokens_per_step / 1e9:.2f} B tokens",
        f"memory/{unit:<7}{mem.line()}",
        f"compute      {flops_per_step / 1e15:.2f} PFLOP/step",
    ]
    if engine == "megatron":
        name, gib = REFERENCE_GPU
        verdict = "fits" if mem.total / GIB <= gib * 0.9 else "does NOT fit"
        hint = (
            ""
            if verdict == "fits"
            else (
                "; try more GPUs (cluster.nodes/gpus_per_node) with the distributed optimizer, parallel.cp=2 "
                "for long sequences, parallel.tp/pp, or parallel.recompute=full"
            )
        )
        lines.append(f"fit          {verdict} a {gib:.0f} GiB {name} (90% budget){hint}")
    return "\n".join(lines)

"""The peer for scripts/bench.py: a bare Megatron-Core + Transformer Engine training loop.

Written straight against Megatron-Core's API, the way Megatron-LM's pretrain_gpt drives it (TE layer spec,
DDP with FP32 grad reduce, distributed optimizer, forward_backward_func, one loss all-reduce per step), with
none of llmtrain's code, so the benchmark compares llmtrain's engine against what a user would write by hand.
Single GPU; mock data (random tokens), labelled so in the results.

    python scripts/bench_bare_megatron.py --precisions bf16,fp8_cs --layers 4 --steps 10
    python scripts/bench_bare_megatron.py --precisions fp8_cs --layers 16 --hidden 2048 --ffn 8192 \
        --kv-channels 64 --tie --seq 1024 --mbs 4 --mb 4 --profile     # the 1B model, + one profiled step

`--profile` adds one step under torch.profiler, grouped by scripts/profile_step.py (measurement tooling,
shared with scripts/bench.py so both loops are profiled alike).
"""

import argparse
import json
import os
import traceback
from functools import partial

import torch
import torch.nn.functional as F


def build(args, precision: str):
    import transformer_engine.pytorch  # noqa: F401  (before anything imports transformer_engine_torch)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():  # once per process: later precisions reuse it
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)

    from megatron.core.tensor_parallel import layers

    fp8 = {"fp8": "hybrid", "fp8_recipe": "tensorwise"} if precision == "fp8_cs" else {}
    # Fused wgrad accumulation needs apex's extension for Megatron's output-layer linear.
    grad_accum_fusion = bool(getattr(layers, "_grad_accum_fusion_available", False))
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        apply_rope_fusion=True,
        cross_entropy_loss_fusion=True,
        cross_entropy_fusion_impl="native",
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=grad_accum_fusion,
        **fp8,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_with_transformer_engine_spec(),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        rotary_base=500000,
        share_embeddings_and_output_weights=args.tie,
    ).cuda()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        use_distributed_optimizer=True,
    )
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-4,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
            overlap_param_gather=True,
        ),
        [model],
    )
    config.no_sync_func = model.no_sync
    config.grad_sync_func = model.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, grad_accum_fusion


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


def forward_step(data_iterator, model):
    tokens, labels, loss_mask = (t.cuda(non_blocking=True) for t in next(data_iterator))
    return model(tokens, None, None, labels=labels), partial(loss_func, loss_mask)


def run(args, precision: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from profile_step import time_steps  # scripts/ is on sys.path when run as a script

    start = torch.cuda.memory_allocated()  # left by the previous precision: ~0 unless something leaked
    torch.cuda.reset_peak_memory_stats()
    model, optimizer, grad_accum_fusion = build(args, precision)
    built = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(0)
    data = [
        (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.ones(args.mbs, args.seq))
        for tokens in (
            torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=gen) for _ in range(args.mb)
        )
    ]
    fb = get_forward_backward_func()

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = fb(
            forward_step_func=forward_step,
            data_iterator=iter(data),
            model=[model],
            num_microbatches=args.mb,
            seq_length=args.seq,
            micro_batch_size=args.mbs,
            forward_only=False,
        )
        optimizer.step()
        total = sum(o["lm loss"] for o in out)
        torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()  # between steps: weights, grads, optimizer, caches
    losses = []
    timing = time_steps(lambda: losses.append(step()), args.steps)
    out = {
        "impl": "bare-megatron-core",
        "grad_accum_fusion": grad_accum_fusion,
        "precision": precision,
        **timing,
        "tokens_per_step": args.mb * args.mbs * args.seq,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "start_mem_gib": start / 2**30,
        "built_mem_gib": built / 2**30,
        "resident_mem_gib": resident / 2**30,
        "last_loss": losses[-1],
        "data": "mock (random tokens)",
    }
    if args.profile:
        from profile_step import profile_one_step  # scripts/ is on sys.path when run as a script

        out["profile"] = profile_one_step(step, optimizer, trace_path(args, precision))
    return out


def trace_path(args, precision: str) -> str | None:
    keep = (not args.trace_models or args.model_name in args.trace_models.split(",")) and (
        not args.trace_precisions or precision in args.trace_precisions.split(",")
    )
    return (
        os.path.join(args.traces, f"{args.model_name}_{precision}_bare.json.gz")
        if args.traces and keep
        else None
    )


def main(argv=None) -> None:
    """Each precision in turn in this process (one model at a time), one result line each."""
    import gc

    args = parse(argv)
    for precision in args.precisions.split(","):
        try:
            r = run(args, precision)
        except Exception:  # the next precision still runs; bench.py shows this one failed
            r = {
                "impl": "bare-megatron-core",
                "precision": precision,
                "error": traceback.format_exc()[-2000:],
            }
        print("BENCH_RESULT " + json.dumps(r), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", default="bf16", help="comma-separated, from: bf16, fp8_cs")
    p.add_argument("--model-name", default="model", help="names the trace files")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8, help="query groups (GQA)")
    p.add_argument("--kv-channels", type=int, default=128)
    p.add_argument("--tie", action="store_true", help="share embedding and output weights")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--mbs", type=int, default=1, help="micro-batch size (sequences)")
    p.add_argument("--mb", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="profile one more step (kernel time by kind)")
    p.add_argument("--traces", default="", help="with --profile: keep gzipped Chrome traces in this folder")
    p.add_argument("--trace-models", default="", help="keep traces only when --model-name is one of these")
    p.add_argument("--trace-precisions", default="", help="keep traces of these precisions only")
    args = p.parse_args(argv)
    bad = [x for x in args.precisions.split(",") if x not in ("bf16", "fp8_cs")]
    if bad:
        p.error(f"--precisions {','.join(bad)}: allowed values are bf16, fp8_cs")
    return args


if __name__ == "__main__":
    main()

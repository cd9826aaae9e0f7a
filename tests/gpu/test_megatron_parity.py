"""Parity: the torch reference model and the Megatron engine from the same weights, on the same batches.

1B debug model (Llama 3.2 1B shapes, tied embeddings), seq 1024, 50 steps with a 10-step linear warm-up to
3e-4, each step 4 fresh micro-batches of mock tokens drawn from a Zipf(1.1) unigram law (the same batches for
both), so the loss falls smoothly from ln(vocab) towards the law's entropy instead of memorising a batch.
The torch side is LlamaModel with BF16 autocast, FP32 weights and torch AdamW with the same hyper-parameters
and weight-decay grouping as Megatron (no decay on 1-D weights); the Megatron side is the engine (TE, BF16).
"""

import math

import pytest
import torch

from llmtrain.engines.base import DistInfo
from llmtrain.engines.megatron_engine.testing import dispose, make_config, mock_batches, record
from llmtrain.models import ModelSpec
from llmtrain.models.llama import LlamaModel, causal_lm_loss

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    # TE must load its CUDA libraries (cuDNN) before torch's kernels pull in their own copies.
    pytest.importorskip("transformer_engine.pytorch")

STEPS, WARMUP, LR, SEQ = 50, 10, 3e-4, 1024
# BF16 tolerances: the two stacks round differently (TE fused kernels vs eager torch): 0.02 nats on the
# same batch at the same weights. Along the curves the warm-up passes through a loss spike (12 -> 14 ->
# 10 in the first steps) that amplifies those rounding differences; measured on an H200 (2026-12-01):
# max 1.05% relative at step 11, <= 0.21% over steps 15-50. Bounds: 1.5% in the first TRANSIENT steps,
# 0.5% after (a first guess of 1% everywhere was too tight for the spike).
INIT_TOL, TRANSIENT, TRANSIENT_RTOL, CURVE_RTOL = 0.02, 15, 0.015, 0.005


def lr_at(step: int) -> float:
    return LR * min(1.0, (step + 1) / WARMUP)  # linear warm-up, then constant


def torch_losses(model, step_batches, cfg) -> tuple[float, float, list[float]]:
    """(fp32 loss, bf16-autocast loss) at init on step 0's batches, then one AdamW step (bf16 autocast)
    per entry of `step_batches`."""
    dev = torch.device("cuda")

    def global_loss(batches, train: bool):
        tot, n = 0.0, 0.0
        for b in batches:
            logits = model(b["tokens"].to(dev))
            mask = b["loss_mask"].to(dev)
            loss = causal_lm_loss(logits, b["labels"].to(dev), mask)
            if train:
                (loss / len(batches)).backward()  # token mean: every micro-batch has the same mask
            tot, n = tot + loss.item() * mask.sum().item(), n + mask.sum().item()
        return tot / n

    with torch.no_grad():
        fp32 = global_loss(step_batches[0], False)
        with torch.autocast("cuda", torch.bfloat16):
            bf16 = global_loss(step_batches[0], False)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        fused=True,
    )
    curve = []
    for step, batches in enumerate(step_batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            curve.append(global_loss(batches, True))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
    return fp32, bf16, curve


def test_torch_vs_megatron_same_weights():
    from llmtrain.engines.megatron_engine import MegatronEngine

    cfg = make_config("llama3_1b", "bf16", "single", {"model": {"seq_length": SEQ}})
    spec = ModelSpec.from_config(cfg.model)
    torch.manual_seed(0)
    ref = LlamaModel(spec)
    ref.init_weights()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())  # both sides start from exactly representable BF16 weights
    weights = {k: v.clone() for k, v in ref.state_dict().items()}
    step_batches = [mock_batches(4, 1, SEQ, spec.vocab_size, seed=s, zipf=1.1) for s in range(STEPS)]

    t_fp32, t_bf16, t_curve = torch_losses(ref.cuda(), step_batches, cfg)
    del ref
    torch.cuda.empty_cache()

    engine = MegatronEngine(cfg, DistInfo())
    engine.load_reference_state_dict(weights)
    back = engine.reference_state_dict()
    mapping_exact = all(torch.equal(back[k], weights[k]) for k in weights)
    m_init = engine.eval_loss(step_batches[0])
    m_curve = [engine.train_step(b, lr=lr_at(step)).loss for step, b in enumerate(step_batches)]
    dispose(engine)

    diffs = [abs(a - b) for a, b in zip(t_curve, m_curve)]
    rel = [d / t for d, t in zip(diffs, t_curve)]
    record(
        "parity_llama3_1b",
        {
            "data": "mock (Zipf(1.1) tokens, fresh each step)",
            "seq": SEQ,
            "steps": STEPS,
            "lr": LR,
            "init_loss": {"torch_fp32": t_fp32, "torch_bf16_autocast": t_bf16, "megatron_bf16": m_init},
            "torch_curve": t_curve,
            "megatron_curve": m_curve,
            "max_abs_curve_diff": max(diffs),
            "max_rel_curve_diff": max(rel),
            "mean_abs_curve_diff": sum(diffs) / len(diffs),
            "mapping_round_trip_exact": mapping_exact,
        },
    )
    assert mapping_exact
    assert abs(m_init - t_fp32) < INIT_TOL
    assert math.isclose(t_curve[0], m_curve[0], abs_tol=INIT_TOL)
    assert max(rel[:TRANSIENT]) < TRANSIENT_RTOL
    assert max(rel[TRANSIENT:]) < CURVE_RTOL
    assert m_curve[-1] < m_curve[0] - 1.0  # it learns (the unigram law)

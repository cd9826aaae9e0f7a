"""QuantLinear quantizes each weight once per optimizer step: hits on micro-batches 2..n, a miss after every
optimizer step (also for optimizers that do not bump the version counter), identical training either way."""

import pytest
import torch
from torch import nn

from llmtrain.dist import DistInfo
from llmtrain.engines.megatron_engine.batches import mock_batches
from llmtrain.engines.torch_engine.engine import TorchEngine
from llmtrain.precision import PrecisionConfig, PrecisionRecipe, QuantLinear, quantized_layers
from tests.megatron_helpers import make_config

NVFP4 = dict(name="nvfp4", weight_format="nvfp4", activation_format="nvfp4", grad_format="nvfp4",
             weight_block_2d=True, rht=True, dgrad_rounding="stochastic", wgrad_rounding="stochastic")  # fmt: skip


def _layer(**kw):
    lin = nn.Linear(64, 48, bias=False)
    return QuantLinear(lin, PrecisionRecipe.from_config(PrecisionConfig(**{**NVFP4, **kw})), seed=3)


def _micro_batch(layer, seed):
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    layer(x).square().mean().backward()


def _counts(layer):
    return layer.weight_cache_hits, layer.weight_cache_misses


@pytest.mark.parametrize("fused", [False, True])
def test_hits_on_micro_batches_2_to_n_and_misses_after_optimizer_step(fused):
    layer = _layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, foreach=False, fused=fused)
    for step in range(3):
        layer.begin_step(step)
        for mb in range(4):
            _micro_batch(layer, 10 * step + mb)
        # fprop W and dgrad W^T: one miss each on micro-batch 1, one hit each on micro-batches 2..4
        assert _counts(layer) == (6 * (step + 1), 2 * (step + 1))
        opt.step()
        opt.zero_grad()
    # After the last step, without begin_step (e.g. the sqrt(3) probe or eval): the new weights miss.
    _micro_batch(layer, 99)
    assert _counts(layer) == (18, 8)


def test_in_place_weight_edit_invalidates_and_stochastic_weights_redraw_each_step():
    layer = _layer()
    _micro_batch(layer, 0)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # e.g. load_state_dict's copy_: bumps the version counter
    _micro_batch(layer, 1)
    assert _counts(layer) == (0, 4)
    sr = _layer(sr_operands="all")  # dgrad W stochastically rounded
    assert sr.recipe.dgrad_w.rounding == "stochastic"
    sr.begin_step(0)
    _micro_batch(sr, 0)
    _micro_batch(sr, 1)
    assert _counts(sr) == (2, 2)  # one draw per step, as TE's cached weight workspace
    first = sr._weight_cache[True][1].values.clone()
    sr.begin_step(1)
    _micro_batch(sr, 2)
    assert _counts(sr) == (2, 4) and not torch.equal(first, sr._weight_cache[True][1].values)


def _train(precision, cache, steps=2, micro_batches=4):
    model = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, seq_length=32)  # fmt: skip
    over = {
        "model": model,
        "train": {"device": "cpu", "micro_batch_size": 1, "global_batch_size": micro_batches},
        "precision": {"bf16_layers": {"first": 0, "last": 0}},
    }
    cfg = make_config("tiny", precision, "single", over)
    cfg.engine.name = "torch"
    engine = TorchEngine(cfg, DistInfo())
    for layer in quantized_layers(engine.model).values():
        layer.cache_weights = cache
    data = mock_batches(steps * micro_batches, 1, 32, cfg.model.vocab_size, seed=5)
    results = []
    for step in range(steps):
        engine.begin_step(step + 1)
        mbs = data[step * micro_batches : (step + 1) * micro_batches]
        r = engine.train_step(mbs, lr=1e-3)
        results.append((r.loss, r.grad_norm))
    hits = sum(m.weight_cache_hits for m in quantized_layers(engine.model).values())
    return results, {k: v.detach().clone() for k, v in engine.model.state_dict().items()}, hits


@pytest.mark.parametrize("precision", ["fp8_cs", "mxfp8", "nvfp4"])
def test_training_is_bit_identical_with_and_without_the_cache(precision):
    cached, params_cached, hits = _train(precision, cache=True)
    plain, params_plain, no_hits = _train(precision, cache=False)
    assert no_hits == 0 and hits == 2 * 2 * 7 * 2 * 3  # steps x layers x GEMMs x (W, W^T) x mb 2..4
    assert cached == plain
    assert all(torch.equal(params_cached[k], params_plain[k]) for k in params_plain)

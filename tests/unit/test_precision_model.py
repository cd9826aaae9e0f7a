"""convert_model on the Llama, the shipped precision configs and the QAF controller (the probe: test_monitor.py)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.errors import ConfigError
from llmtrain.models import ModelSpec
from llmtrain.models.llama import LlamaModel, causal_lm_loss
from llmtrain.precision import (
    PrecisionConfig,
    PrecisionController,
    QuantLinear,
    convert_model,
    quantized_layers,
    set_qaf,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "precision"
SPEC = ModelSpec(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=32)  # fmt: skip


def load(config: str, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(PrecisionConfig), OmegaConf.load(CONFIGS / f"{config}.yaml"))
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def model(seed=0):
    m = LlamaModel(SPEC)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SPEC.vocab_size, (2, SPEC.seq_length + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SPEC.seq_length)}


def loss_fn(m, mb):
    return causal_lm_loss(m(mb["tokens"]), mb["labels"], mb["loss_mask"])


def test_shipped_configs_validate_and_describe_their_recipes():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["bf16", "fp8_cs", "mxfp4", "mxfp8", "nvfp4", "nvfp4_fp4all"]
    for name in names:
        cfg = load(name, **({"bf16_layers.last": 1} if name == "nvfp4" else {}))
        m = model()
        convert_model(m, cfg, seed=1)
        n_q = len(quantized_layers(m))
        assert n_q == (
            0 if name == "bf16" else 7 * (SPEC.num_layers - cfg.bf16_layers.first - cfg.bf16_layers.last)
        )
    nvfp4 = load("nvfp4", **{"bf16_layers.last": 1})
    m = model()
    convert_model(m, nvfp4)
    r = next(iter(quantized_layers(m).values())).recipe
    assert r.fprop_w.block_2d and r.dgrad_w.block_2d and not r.fprop_x.block_2d
    assert r.rht and r.dgrad_dy.rounding == r.wgrad_dy.rounding == "stochastic"
    assert r.fprop_x.rounding == r.fprop_w.rounding == r.wgrad_x.rounding == "nearest"
    fp4all = load("nvfp4_fp4all")
    assert fp4all.monitor.enabled and fp4all.qaf.trigger == "sqrt3"
    m = model()
    convert_model(m, fp4all)
    r = next(iter(quantized_layers(m).values())).recipe
    assert not r.rht and not r.fprop_w.block_2d
    fp8 = load("fp8_cs")
    assert (fp8.weight_format, fp8.activation_format, fp8.grad_format) == ("fp8_e4m3", "fp8_e4m3", "fp8_e5m2")


@pytest.mark.parametrize("name", ["fp8_cs", "mxfp8", "nvfp4", "nvfp4_fp4all", "mxfp4"])
def test_convert_quantizes_keeps_names_and_trains(name):
    cfg = load(name, **{"bf16_layers.first": 1, "bf16_layers.last": 0})
    ref, m = model(), model()
    keys = {k: v.shape for k, v in ref.state_dict().items()}
    convert_model(m, cfg, seed=3)
    assert {k: v.shape for k, v in m.state_dict().items()} == keys  # checkpoints / HF conversion unchanged
    assert not isinstance(m.layers[0].self_attn.q_proj, QuantLinear)  # bf16_layers.first=1
    assert isinstance(m.layers[1].mlp.down_proj, QuantLinear) and isinstance(
        m.layers[2].self_attn.o_proj, QuantLinear
    )
    assert type(m.lm_head) is torch.nn.Linear and type(m.embed_tokens) is torch.nn.Embedding
    mb = batch()
    lq, lr = loss_fn(m, mb), loss_fn(ref, mb)
    assert torch.isfinite(lq) and lq.item() != lr.item()  # actually quantizes, no silent BF16
    assert abs(lq.item() - lr.item()) < 0.05 * lr.item()
    lq.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bf16_is_a_noop_and_bad_configs_raise():
    m = model()
    before = [type(mod) for mod in m.modules()]
    convert_model(m, load("bf16"))
    assert [type(mod) for mod in m.modules()] == before
    with pytest.raises(ConfigError, match=r"precision\.weight_format"):
        convert_model(model(), load("nvfp4", weight_format="fp6"))
    with pytest.raises(ConfigError, match=r"precision\.name"):
        convert_model(model(), load("nvfp4", name="fp2"))
    with pytest.raises(ConfigError, match="allowed: nearest, stochastic"):
        convert_model(model(), load("nvfp4", dgrad_rounding="up"))
    with pytest.raises(ConfigError, match="keeps all 3 transformer layers in BF16"):
        convert_model(model(), load("nvfp4"))  # last: 4 on a 3-layer model
    with pytest.raises(ConfigError, match="nothing"):
        convert_model(
            model(), load("fp8_cs", weight_format="bf16", activation_format="bf16", grad_format="bf16")
        )
    with pytest.raises(ConfigError, match="BF16 does not quantize"):
        convert_model(model(), load("bf16", weight_format="nvfp4"))
    with pytest.raises(ConfigError, match="monitor"):
        convert_model(model(), load("nvfp4_fp4all", **{"monitor.enabled": False}))
    with pytest.raises(ConfigError, match=r"precision\.backend"):
        convert_model(model(), load("fp8_cs", backend="native"))
    with pytest.raises(ConfigError, match=r"precision\.qaf.trigger"):
        PrecisionController(load("nvfp4_fp4all", **{"qaf.trigger": "never"}), 100)


def test_controller_sqrt3_trigger_with_patience_and_resume():
    cfg = load("nvfp4_fp4all", **{"monitor.interval": 10, "qaf.patience": 2})
    c = PrecisionController(cfg, total_steps=1000)
    assert [s for s in range(1, 41) if c.should_probe(s)] == [10, 20, 30, 40]
    m = c.record_probe(10, {"layers.0.mlp.up_proj": 1.0, "layers.0.mlp.down_proj": 3.0, "all": 2.0})
    assert m["sqrt3/all"] == 2.0 and m["sqrt3/min"] == 1.0 and m["sqrt3/frac_below"] == 0.5
    assert m["sqrt3/layers.0.mlp.up_proj"] == 1.0 and m["sqrt3/below_streak"] == 0
    assert not c.should_switch_qaf(10)
    c.record_probe(20, {"a": 1.0, "all": 1.5})
    assert not c.should_switch_qaf(20)
    c.record_probe(30, {"a": 1.0, "all": 2.5})  # streak broken
    c.record_probe(40, {"a": 1.0, "all": 1.0})
    state = c.state_dict()
    resumed = PrecisionController(cfg, total_steps=1000)
    resumed.load_state_dict(state)
    assert resumed.below_streak == 1
    resumed.record_probe(50, {"a": 1.0, "all": 1.2})
    assert resumed.should_switch_qaf(50) and resumed.qaf_active and resumed.qaf_step == 50
    assert not resumed.should_switch_qaf(60)  # switches once
    again = PrecisionController(cfg, total_steps=1000)
    again.load_state_dict(resumed.state_dict())
    assert again.qaf_active and again.qaf_step == 50 and not again.should_switch_qaf(70)
    # Old checkpoints that only stored the QAF flags still load.
    again.load_state_dict({"qaf_active": False, "qaf_step": None})
    assert again.below_streak == 0


def test_controller_fraction_trigger_and_bf16_inert():
    c = PrecisionController(load("nvfp4_fp4all", **{"qaf.trigger": "fraction", "qaf.fraction": 0.75}), 100)
    assert [s for s in range(1, 101) if c.should_switch_qaf(s)] == [75]
    off = PrecisionController(load("nvfp4_fp4all", **{"qaf.trigger": "off"}), 100)
    assert not any(off.should_switch_qaf(s) for s in range(1, 101))
    bf16 = PrecisionController(load("bf16"), 100)
    assert not any(bf16.should_probe(s) or bf16.should_switch_qaf(s) for s in range(1, 101))
    assert bf16.record_probe(1, {}) == {}


def test_qaf_switch_changes_only_the_backward():
    m = model()
    convert_model(m, load("nvfp4_fp4all"))
    mb = batch(3)
    l1 = loss_fn(m, mb)
    g1 = torch.autograd.grad(l1, [m.layers[0].mlp.up_proj.weight])[0]
    set_qaf(m, True)
    l2 = loss_fn(m, mb)
    g2 = torch.autograd.grad(l2, [m.layers[0].mlp.up_proj.weight])[0]
    assert l1.item() == l2.item() and not torch.allclose(g1, g2)

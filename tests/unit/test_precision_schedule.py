"""Per-operand settings, the precision schedule (phases, triggers, phase LR, resume) and BF16-layer fractions."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.models import ModelSpec
from llmtrain.models.llama import LlamaModel
from llmtrain.precision import (
    PrecisionConfig,
    PrecisionController,
    PrecisionRecipe,
    RunShape,
    convert_model,
    quantized_layers,
    validate,
    validate_schedule,
)
from llmtrain.precision.hadamard import random_signs
from llmtrain.precision.recipe import Operand, bf16_layer_counts
from llmtrain.train.schedule import learning_rate

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "precision"
SPEC = ModelSpec(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128, seq_length=32)  # fmt: skip


def load(config: str, **overrides):
    """configs/precision/<config>.yaml on the schema, following `defaults` the way Hydra does here."""
    raw = OmegaConf.load(CONFIGS / f"{config}.yaml")
    parents = [d for d in raw.pop("defaults", []) if d != "_self_"]
    cfg = OmegaConf.structured(PrecisionConfig)
    for parent in parents:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(CONFIGS / f"{parent}.yaml"))
    cfg = OmegaConf.merge(cfg, raw)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def with_schedule(cfg, *entries):
    return OmegaConf.merge(cfg, {"schedule": list(entries)})


def optim(schedule="wsd", warmup=10, decay_fraction=0.2, lr=1.0, min_lr=0.1):
    return OmegaConf.create(
        {
            "schedule": schedule,
            "warmup_steps": warmup,
            "decay_fraction": decay_fraction,
            "lr": lr,
            "min_lr": min_lr,
        }
    )


def run(steps=100, tokens_per_step=1000, **kw):
    return RunShape(steps, tokens_per_step, optim(**kw))


def phase(**kw):
    return {"name": "p", "trigger": "step", "at": 10, "set": {"fprop": "bf16"}, **kw}


# ---- per-operand settings -----------------------------------------------------------------------------


def test_fp4all_is_the_papers_split_rounding():
    """Eqs. 4-6 of "FP4 All the Way": fwd RtN(W) RtN(a); dgrad RtN(W^T) SR(delta); wgrad SR(delta) SR(a^T)."""
    r = PrecisionRecipe.from_config(load("nvfp4_fp4all"))
    sr, rtn = Operand("nvfp4", "stochastic"), Operand("nvfp4", "nearest")
    assert r.operands == {
        "fprop_x": rtn, "fprop_w": rtn, "dgrad_dy": sr, "dgrad_w": rtn, "wgrad_dy": sr, "wgrad_x": sr,
    }  # fmt: skip
    assert not r.rht


def test_role_level_keys_keep_their_meaning_without_operand_overrides():
    # sr_operands=grad: SR on the gradient operand only; =all: on both operands of dgrad and wgrad.
    grad = PrecisionRecipe.from_config(load("nvfp4", **{"bf16_layers.last": 0}))
    assert (grad.dgrad_w.rounding, grad.wgrad_x.rounding, grad.wgrad_dy.rounding) == (
        "nearest",
        "nearest",
        "stochastic",
    )
    assert grad.fprop_w.block_2d and grad.dgrad_w.block_2d and not grad.wgrad_x.block_2d and grad.rht
    every = PrecisionRecipe.from_config(load("nvfp4", sr_operands="all"))
    assert every.dgrad_w.rounding == every.wgrad_x.rounding == "stochastic"
    no_dgrad = PrecisionRecipe.from_config(load("fp8_cs", quantize_dgrad=False))
    assert (
        not no_dgrad.dgrad_dy.quantized
        and not no_dgrad.dgrad_w.quantized
        and no_dgrad.wgrad_dy.fmt == "fp8_e5m2"
    )


def test_operand_overrides_change_one_operand_each():
    cfg = load(
        "nvfp4",
        **{
            "operands.dgrad_w.format": "mxfp8",
            "operands.fprop_x.block_2d": True,
            "operands.wgrad_dy.rounding": "nearest",
            "operands.wgrad_dy.rht": False,
            "operands.wgrad_x.rht": False,
        },
    )
    r = PrecisionRecipe.from_config(cfg)
    assert r.dgrad_w == Operand("mxfp8", "nearest", True)  # keeps its role's 2-D blocks, new format
    assert r.fprop_x.block_2d and r.wgrad_dy.rounding == "nearest" and not r.rht
    assert r.fprop_w == Operand("nvfp4", "nearest", True) and r.dgrad_dy == Operand("nvfp4", "stochastic")
    # An explicit format quantizes an operand whose GEMM is otherwise off.
    r = PrecisionRecipe.from_config(
        load("fp8_cs", quantize_wgrad=False, **{"operands.wgrad_x.format": "fp8_e4m3"})
    )
    assert r.wgrad_x.fmt == "fp8_e4m3" and not r.wgrad_dy.quantized


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"operands.wgrad_x.rht": False}, r"precision\.operands\.wgrad_x\.rht=False: wgrad dy has rht=True"),
        (
            {"operands.fprop_x.rht": True},
            r"precision\.operands\.fprop_x\.rht=True: the RHT belongs to the wgrad",
        ),
        (
            {"operands.dgrad_w.format": "fp6"},
            r"precision\.operands\.dgrad_w\.format='fp6': not a valid choice",
        ),
        ({"operands.dgrad_w.rounding": "up"}, r"precision\.operands\.dgrad_w\.rounding='up'"),
        ({"operands.dgrad_w.format": "fp8_e4m3", "operands.dgrad_w.block_2d": True}, "2-D blocks exist for"),
    ],
)
def test_bad_operand_settings_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        validate(load("nvfp4", **overrides))
    assert "\n" not in str(info.value)


# ---- BF16 layers as a fraction of depth -----------------------------------------------------------------


def test_bf16_layer_fraction_means_the_same_share_at_any_depth():
    cfg = load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.last_fraction": 0.125})
    assert [bf16_layer_counts(cfg, n)[1] for n in (16, 32, 80, 4, 3)] == [2, 4, 10, 1, 0]  # round half up
    nvidia_12b = load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.first_fraction": 0.03,
                                   "bf16_layers.last_fraction": 0.13})  # fmt: skip
    assert bf16_layer_counts(nvidia_12b, 62) == (2, 8)  # NVIDIA's 12B: first 2 + last 8 of 62
    m = LlamaModel(SPEC)
    convert_model(m, load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.last_fraction": 0.34}))
    assert len(quantized_layers(m)) == 7 * 2  # floor(0.34 * 3 + 0.5) = 1 layer kept in BF16
    with pytest.raises(
        ConfigError, match=r"keeps all 3 transformer layers in BF16 \(last_fraction=0.9 -> 3\)"
    ):
        validate(load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.last_fraction": 0.9}), num_layers=3)
    with pytest.raises(
        ConfigError, match=r"bf16_layers\.last_fraction=0.5: precision\.bf16_layers\.last=4 is set"
    ):
        validate(load("nvfp4", **{"bf16_layers.last_fraction": 0.5}))
    with pytest.raises(ConfigError, match=r"last_fraction=1.0: must be in \[0, 1\)"):
        validate(load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.last_fraction": 1.0}))


def test_fp8_cs_keeps_first_and_last_layer_as_megatron_bridge_and_the_variant_none():
    m = LlamaModel(SPEC)
    convert_model(m, load("fp8_cs"))
    assert {n.split(".")[1] for n in quantized_layers(m)} == {"1"}  # layers 0 and 2 stay BF16
    assert bf16_layer_counts(load("variant/fp8_cs_all_layers"), 3) == (0, 0)
    with pytest.raises(ConfigError, match=r"precision=variant/fp8_cs_all_layers"):
        validate(load("fp8_cs"), num_layers=2)


def test_random_rht_signs_are_one_vector_per_run_as_on_the_megatron_engine():
    m = LlamaModel(SPEC)
    convert_model(m, load("nvfp4", rht_signs="random", **{"bf16_layers.last": 0}), seed=7)
    expected = random_signs(16, torch.Generator().manual_seed(8))  # te_custom.activate: seed + 1
    signs = [layer.rht_signs(torch.device("cpu")) for layer in quantized_layers(m).values()]
    assert len(signs) == 21 and all(torch.equal(s, expected) for s in signs)


# ---- the schedule: parsing and validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "shape", "match"),
    [
        (phase(at=100), {}, r"schedule\.0\.at=100.0: phase 'p' would start after step 100, outside 1\.\.99"),
        (
            phase(trigger="decay", at=0),
            {"schedule": "constant"},
            r"schedule\.0\.trigger='decay': can never fire",
        ),
        (phase(trigger="decay", at=0), {"schedule": "cosine", "warmup": 200}, r"would start after step 200"),
        (phase(set={"fprop": "nvfp4"}), {}, r"phase 'p' changes nothing"),
        (phase(set={}), {}, r"phase 'p' changes nothing"),
        (phase(trigger="sqrt3"), {}, r"schedule\.0\.trigger='sqrt3': can never fire: the monitor is off"),
        (phase(trigger="append"), {}, r"schedule\.0\.steps=0: an appended phase needs exactly one budget"),
        (phase(trigger="append", steps=100), {}, r"leave nothing of train\.steps=100"),
        (phase(steps=5), {}, r"a budget belongs to trigger=append"),
        (phase(trigger="fraction", at=1.5), {}, r"trigger=fraction takes a share"),
        (phase(trigger="soon"), {}, r"schedule\.0\.trigger='soon': not a valid choice"),
        (phase(set={"fprop,bwd": "bf16"}), {}, r"schedule\.0\.set='bwd': not a GEMM or operand"),
        (phase(set={"fprop": "fp6"}), {}, r"schedule\.0\.set\.fprop\.format='fp6'"),
        (phase(name=""), {}, r"schedule\.0\.name='': each phase needs a unique name"),
        (phase(lr={"schedule": "linear"}), {}, r"schedule\.0\.lr\.schedule='linear'"),
    ],
)
def test_a_schedule_that_cannot_work_is_one_line_naming_the_key(entry, shape, match):
    cfg = load("nvfp4", **{"bf16_layers.last": 0})
    cfg = with_schedule(cfg, entry)
    with pytest.raises(ConfigError, match=match) as info:
        validate_schedule(cfg, run(**shape))
    assert "\n" not in str(info.value)


def test_phases_out_of_order_and_after_an_appended_phase_are_refused():
    cfg = load("nvfp4", **{"bf16_layers.last": 0})
    cfg = with_schedule(cfg, phase(name="a", at=50), phase(name="b", at=40, set={"dgrad": "bf16"}))
    with pytest.raises(
        ConfigError, match=r"schedule\.1\.at=40.0: phase 'b' would start after step 40, not after"
    ):
        validate_schedule(cfg, run())
    cfg = with_schedule(
        cfg, phase(name="a", trigger="append", steps=10), phase(name="b", set={"dgrad": "bf16"})
    )
    with pytest.raises(ConfigError, match=r"schedule\.1\.trigger='step': comes after an appended phase"):
        validate_schedule(cfg, run())
    cfg = load("nvfp4_fp4all")
    cfg = with_schedule(cfg, phase())
    with pytest.raises(ConfigError, match=r"precision\.qaf\.trigger='sqrt3': precision\.schedule is set too"):
        validate(cfg)
    bf16 = load("bf16")
    bf16 = with_schedule(bf16, phase())
    with pytest.raises(ConfigError, match=r"precision\.schedule need a quantized precision"):
        validate(bf16)


# ---- the controller: triggers, LR, resume ---------------------------------------------------------------


def switches(c: PrecisionController, steps: int) -> dict[int, str]:
    out = {}
    for s in range(1, steps + 1):
        p = c.advance(s)
        if p is not None:
            out[s] = p.name
    return out


def test_static_triggers_switch_after_their_step_and_apply_on_top_of_each_other():
    cfg = load("fp8_cs", **{"bf16_layers.first": 0, "bf16_layers.last": 0})
    cfg = with_schedule(
        cfg,
        phase(name="by_tokens", trigger="tokens", at=20_500, set={"wgrad_x": {"rounding": "stochastic"}}),
        phase(name="by_fraction", trigger="fraction", at=0.3, set={"dgrad,wgrad": "bf16"}),
        phase(name="at_decay", trigger="decay", at=-5, set={"fprop": "bf16"}),
        phase(name="appended", trigger="append", tokens=4_500, set={"fprop_w": "fp8_e4m3"}),
    )
    c = PrecisionController(cfg, 100, optim=optim("wsd", decay_fraction=0.2), tokens_per_step=1000)
    # tokens: ceil(20500/1000)=21; fraction: ceil(0.3*100)=30; appended: ceil(4500/1000)=5 steps, so the
    # base schedule has 95 steps and its WSD decay starts at 95 - round(0.2*95) = 76; decay-5 = 71.
    assert c.base_steps == 95
    assert switches(c, 100) == {21: "by_tokens", 30: "by_fraction", 71: "at_decay", 95: "appended"}
    r = c.recipe
    assert not r.fprop_x.quantized and r.fprop_w.fmt == "fp8_e4m3" and not r.dgrad_dy.quantized
    assert c.recipes[1].wgrad_x == Operand("fp8_e4m3", "stochastic")  # only that operand changed
    assert c.starts == [21, 30, 71, 95] and c.phase_name == "appended"


def test_legacy_qaf_keys_map_onto_a_qaf_phase_with_the_same_switch_step():
    c = PrecisionController(load("nvfp4_fp4all", **{"qaf.trigger": "fraction", "qaf.fraction": 0.7}), 10)
    assert [p.name for p in c.phases] == ["qaf"] and switches(c, 10) == {7: "qaf"}
    assert c.qaf_active and c.qaf_step == 7
    assert not any(o.quantized for n, o in c.recipe.operands.items() if not n.startswith("fprop"))
    assert c.recipe.fprop_x == c.recipes[0].fprop_x


def test_sqrt3_phase_waits_for_patience_then_a_later_static_phase_follows():
    cfg = load("nvfp4_fp4all", **{"qaf.trigger": "off", "monitor.interval": 10})
    cfg = with_schedule(cfg, phase(name="q", trigger="sqrt3", patience=2, set={"dgrad,wgrad": "bf16"}),
                    phase(name="f", trigger="step", at=60, set={"fprop": "bf16"}))  # fmt: skip
    c = PrecisionController(cfg, 100, optim=optim())
    seen = {}
    for s in range(1, 101):
        if c.should_probe(s):
            c.record_probe(s, {"a": 1.0, "all": 1.0 if s in (20, 40, 50) else 5.0})
        p = c.advance(s)
        if p:
            seen[s] = p.name
    assert seen == {50: "q", 60: "f"}  # 40 and 50 in a row below sqrt(3); 20 alone is not enough


def test_qaf_phase_resets_the_lr_with_its_own_warmup_and_cosine():
    cfg = load("schedule/nvfp4_fp4all_qaf", **{"schedule.0.fraction": 0.2})
    o = optim("cosine", warmup=2, lr=1.0, min_lr=0.1)
    c = PrecisionController(cfg, 100, optim=o, tokens_per_step=1)
    assert c.base_steps == 80  # floor(0.2 * 100 + 0.5) = 20 appended steps

    def base(i):
        return learning_rate(i, lr=1.0, min_lr=0.1, warmup=2, total=c.base_steps, schedule="cosine")

    lrs = []
    for i in range(100):
        lrs.append(c.learning_rate(i, base))
        c.advance(i + 1)
    assert lrs[:80] == [base(i) for i in range(80)] and lrs[79] == pytest.approx(0.1, abs=1e-3)
    assert lrs[80] == pytest.approx(1.0 / 40) and lrs[99] == pytest.approx(20 / 40)  # 40 warm-up iterations
    assert c.qaf_active and c.starts == [80]
    c2 = PrecisionController(cfg, 100, optim=o, tokens_per_step=1)
    c2.load_state_dict(c.state_dict())
    assert c2.phase == 1 and c2.learning_rate(90, base) == lrs[90] and c2.recipe == c.recipe
    # peak / min / cosine over the phase once the warm-up is done
    c3 = PrecisionController(load("schedule/nvfp4_fp4all_qaf", **{"schedule.0.steps": 30, "schedule.0.fraction": 0,
                             "schedule.0.lr.warmup_steps": 0, "schedule.0.lr.peak": 0.5}), 100, optim=o)  # fmt: skip
    switches(c3, 70)
    assert c3.learning_rate(70, base) == pytest.approx(0.5) and c3.learning_rate(85, base) == pytest.approx(
        0.1 + 0.2 * (1 + math.cos(math.pi * 0.5))
    )


def test_checkpointed_phase_must_match_the_schedule():
    cfg = load("schedule/nvfp4_fwd_bf16_at_decay", **{"bf16_layers.last": 0})
    c = PrecisionController(cfg, 100, optim=optim())
    switches(c, 100)
    state = c.state_dict()
    assert state["phase"] == 1 and state["phase_name"] == "fwd_bf16" and state["phase_starts"] == [80]
    other = load("schedule/fp8_cs_then_bf16")
    with pytest.raises(
        CheckpointError, match=r"precision phase 'fwd_bf16' \(#1\), which precision\.schedule"
    ):
        PrecisionController(other, 100, optim=optim()).load_state_dict(state)
    # A checkpoint from before the schedule (QAF flags only) resumes into the mapped QAF phase.
    legacy = PrecisionController(load("nvfp4_fp4all"), 100, optim=optim())
    legacy.load_state_dict({"qaf_active": True, "qaf_step": 40, "below_streak": 0})
    assert legacy.phase == 1 and legacy.qaf_step == 40


def test_shipped_schedule_configs():
    wsd = optim("wsd", decay_fraction=0.2)
    qaf = PrecisionController(load("schedule/nvfp4_fp4all_qaf"), 1000, optim=wsd)
    assert switches(qaf, 1000) == {960: "qaf"} and qaf.qaf_active  # the last 4% of the steps
    assert qaf.phases[0].lr.reset and qaf.phases[0].lr.warmup_steps == 40
    fwd = PrecisionController(
        load("schedule/nvfp4_fwd_bf16_at_decay", **{"bf16_layers.last": 0}), 1000, optim=wsd
    )
    assert switches(fwd, 1000) == {800: "fwd_bf16"}
    assert not fwd.recipe.fprop_x.quantized and fwd.recipe.dgrad_dy == fwd.recipes[0].dgrad_dy
    fp8 = PrecisionController(load("schedule/fp8_cs_then_bf16"), 1000, optim=wsd)
    assert switches(fp8, 1000) == {800: "bf16_end"} and not fp8.recipe.quantized


# ---- Megatron engine: which phases native TE can run -------------------------------------------------


def test_native_te_runs_backward_override_and_bf16_phases_and_refuses_the_rest():
    from llmtrain.errors import UserError
    from llmtrain.precision import te_recipes

    hopper, blackwell = (9, 0), (10, 0)
    base = PrecisionRecipe.from_config(load("fp8_cs"))
    qaf = PrecisionRecipe.from_config(load("fp8_cs", quantize_dgrad=False, quantize_wgrad=False))
    fwd_bf16 = PrecisionRecipe.from_config(load("fp8_cs", quantize_fprop=False))
    assert te_recipes.native_phase_mode(base, base) == "same"
    assert te_recipes.native_phase_mode(base, qaf) == "high_precision"  # TE: backward_override
    assert te_recipes.native_phase_mode(base, PrecisionRecipe()) == "off"
    assert te_recipes.native_phase_mode(base, fwd_bf16) is None
    # FP8 then BF16, and a QAF switch, stay on TE's native Float8CurrentScaling.
    kw, _ = te_recipes.precision_settings(load("schedule/fp8_cs_then_bf16"), hopper, 16)
    assert kw["fp8_recipe"] == "tensorwise"
    qaf_cfg = load("fp8_cs", **{"qaf.trigger": "fraction"})
    assert te_recipes.precision_settings(qaf_cfg, hopper, 16)[0]["fp8_recipe"] == "tensorwise"
    with pytest.raises(UserError, match=r"backward_override \(Transformer Engine >= 2\.20\)"):
        te_recipes.require_native_phases(qaf_cfg, te_has_backward_override=False)
    te_recipes.require_native_phases(qaf_cfg, te_has_backward_override=True)
    # The forward alone to BF16 is not a TE recipe: emulated under auto, one line under native.
    fwd = load("schedule/nvfp4_fwd_bf16_at_decay")
    kw, desc = te_recipes.precision_settings(fwd, blackwell, 16)
    assert kw["fp4_recipe"] == "custom" and "precision.schedule.0 (fwd_bf16" in desc
    fwd.backend = "native"
    with pytest.raises(UserError, match=r"precision\.schedule\.0 \(fwd_bf16.*use precision\.backend=custom"):
        te_recipes.precision_settings(fwd, blackwell, 16)
    # Fractions of depth reach Megatron's first/last-layer counts.
    frac = load("nvfp4", **{"bf16_layers.last": 0, "bf16_layers.last_fraction": 0.125})
    kw, _ = te_recipes.precision_settings(frac, blackwell, 32)
    assert (kw["num_layers_at_start_in_bf16"], kw["num_layers_at_end_in_bf16"]) == (0, 4)


def test_a_qaf_phase_is_bit_exact_with_the_qaf_mode_on_the_torch_engine():
    """set_recipe (a phase) reaches every QuantLinear; a QAF phase computes what the QAF flag computes."""
    from llmtrain.models.llama import causal_lm_loss
    from llmtrain.precision import set_qaf, set_recipe
    from llmtrain.precision.phases import QAF_CHANGES, apply_changes

    cfg = load("nvfp4", **{"bf16_layers.last": 0})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SPEC.vocab_size, (2, SPEC.seq_length + 1), generator=g)

    def grads(m):
        m.zero_grad()
        causal_lm_loss(m(tokens[:, :-1]), tokens[:, 1:], torch.ones(2, SPEC.seq_length)).backward()
        return [p.grad.clone() for p in m.parameters()]

    models = []
    for _ in range(3):
        m = LlamaModel(SPEC)
        m.init_weights(torch.Generator().manual_seed(1))
        convert_model(m, cfg, seed=2)
        models.append(m)
    base = PrecisionRecipe.from_config(cfg)
    qaf = apply_changes(base, QAF_CHANGES)
    assert base.rht and not qaf.rht  # no transform left once neither wgrad operand is quantized
    set_qaf(models[0], True)
    set_recipe(models[1], qaf)
    assert all(layer.recipe == qaf for layer in quantized_layers(models[1]).values())
    flag, phase, quantized = grads(models[0]), grads(models[1]), grads(models[2])
    assert all(torch.equal(a, b) for a, b in zip(flag, phase))
    assert not all(torch.equal(a, b) for a, b in zip(phase, quantized))

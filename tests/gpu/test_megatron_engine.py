"""Megatron engine on one GPU: build + step per precision, checkpoint round trip, native-recipe errors.

Data is mock (random tokens). Run on the GPU host: `pytest -m gpu tests/gpu -s`.
Set LLMTRAIN_TEST_RESULTS=<file.jsonl> to have the numbers appended there.
"""

import math
import os
import statistics

import pytest
import torch

from llmtrain.dist import DistInfo
from llmtrain.engines.megatron_engine.batches import mock_batches
from llmtrain.errors import UserError
from tests.megatron_helpers import dispose, make_config, record

pytestmark = pytest.mark.gpu

# Deterministic TE attention kernels, so a resumed run repeats an uninterrupted one bit for bit.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")


def engine_for(precision="bf16", parallel="single", model="tiny", overrides=None):
    from llmtrain.engines.megatron_engine import MegatronEngine

    return MegatronEngine(make_config(model, precision, parallel, overrides), DistInfo())


@pytest.mark.parametrize("precision", ["bf16", "fp8_cs"])
def test_build_and_step(precision):
    engine = engine_for(precision)
    batches = mock_batches(2, 2, 256, 4096)
    results = [engine.train_step(batches, lr=1e-3) for _ in range(8)]  # same batches: loss must drop
    losses = [r.loss for r in results]
    record(
        f"step_{precision}",
        {
            "backend": engine.backend_description,
            "losses": losses,
            "grad_norms": [r.grad_norm for r in results],
            **engine.memory_stats(),
        },
    )
    assert abs(losses[0] - math.log(4096)) < 0.5  # ~ln(vocab) at init
    assert all(math.isfinite(r.grad_norm) and not r.skipped for r in results)
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(engine.eval_loss(batches))
    assert ("FP8" in engine.backend_description) == (precision == "fp8_cs")
    dispose(engine)


@pytest.mark.parametrize("precision", ["mxfp8", "nvfp4", "nvfp4_fp4all", "mxfp4"])
def test_block_scaled_recipes_train_native_or_emulated(precision):
    """Blackwell runs TE's native MXFP8/NVFP4; elsewhere (and for knobs or formats TE lacks: MXFP4) ours."""
    over = {"precision": {"bf16_layers": {"last": 1}}} if precision == "nvfp4" else None
    engine = engine_for(precision, overrides=over)
    batches = mock_batches(2, 2, 256, 4096)
    results = [engine.train_step(batches, lr=1e-3) for _ in range(8)]
    losses = [r.loss for r in results]
    native = torch.cuda.get_device_capability() >= (10, 0) and precision in ("mxfp8", "nvfp4")
    record(f"step_{precision}", {"backend": engine.backend_description, "losses": losses})
    assert ("emulated" in engine.backend_description) != native, engine.backend_description
    assert all(math.isfinite(r.grad_norm) and not r.skipped for r in results)
    assert losses[-1] < losses[0] - 0.5
    dispose(engine)


def test_native_backend_refuses_what_this_gpu_cannot_run():
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("Blackwell runs MXFP8/NVFP4 natively")
    with pytest.raises(UserError, match=r"precision\.backend=custom") as info:
        engine_for("mxfp8", overrides={"precision": {"backend": "native"}})
    record("error_native_mxfp8", {"message": str(info.value)})


LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def test_emulated_monitor_and_qaf_switch():
    """sqrt(3) probe on the next global batch: finite ratios, all three noise definitions; QAF then trains
    with the backward in BF16 and the probe still measures the quantized backward."""
    engine = engine_for("nvfp4_fp4all")
    batches = mock_batches(2, 2, 256, 4096)
    for step in (1, 2):
        engine.begin_step(step)
        engine.train_step(batches, lr=1e-3)
    probe = engine.probe_quantization_noise(mock_batches(2, 2, 256, 4096, seed=1), 2)
    assert set(probe.ratios) == {*(f"layers.{i}.{m}" for i in range(4) for m in LINEARS), "all"}
    assert all(0 < v < float("inf") for v in probe.ratios.values()), probe.ratios
    assert all(0 < probe.metrics[k] < float("inf") for k in ("backward", "sr", "grad_norm")), probe.metrics
    engine.set_qaf(True)
    probe_qaf = engine.probe_quantization_noise(batches, 2)
    engine.begin_step(3)
    r = engine.train_step(batches, lr=1e-3)
    record(
        "monitor_nvfp4_fp4all", {"ratios": probe.ratios, "metrics": probe.metrics, "after_qaf_loss": r.loss}
    )
    assert math.isfinite(r.loss) and not r.skipped
    assert all(0 < v < float("inf") for v in probe_qaf.ratios.values())  # the probe sets its own mode
    from llmtrain.precision import te_custom

    assert te_custom.STATE.qaf  # the probe put the QAF flag back
    dispose(engine)


def test_emulated_probe_is_the_same_within_sr_noise_for_micro_batch_1_2_4():
    """One global batch of 8 sequences split into micro-batches of 1, 2 and 4, three SR draws each (as
    tests/unit/test_monitor.py on the CPU): the backward-only and SR ratios must agree within 3 pooled
    standard deviations of one draw. The unquantized gradient norm differs only by each micro-batch's dW being rounded to BF16
    once (2**-9 relative per element) before the FP32 accumulation, hence rel 2e-2."""
    engine = engine_for("nvfp4_fp4all")
    tokens = mock_batches(1, 8, 256, 4096, seed=3, zipf=1.1)[0]

    def split(mbs):
        return [{k: v[i : i + mbs] for k, v in tokens.items()} for i in range(0, 8, mbs)]

    draws = {mbs: [engine.probe_quantization_noise(split(mbs), s) for s in (1, 2, 3)] for mbs in (1, 2, 4)}
    dispose(engine)
    table = {mbs: [p.ratios | p.metrics for p in ps] for mbs, ps in draws.items()}
    record("probe_layouts_nvfp4_fp4all", {str(k): v for k, v in table.items()})
    norms = [p["grad_norm"] for ps in table.values() for p in ps]
    assert max(norms) == pytest.approx(min(norms), rel=2e-2)
    for key in ("backward", "sr"):
        per_layout = [[p[key] for p in ps] for ps in table.values()]
        sd = math.sqrt(statistics.mean(statistics.variance(v) for v in per_layout))
        means = [statistics.mean(v) for v in per_layout]
        assert sd > 0 and max(means) - min(means) < 3 * sd, (key, means, sd)
    # `all` adds the forward's round-to-nearest noise, which really depends on the layout: x's per-tensor
    # scale is taken over one micro-batch (H100: 4.56 / 4.52 / 4.41 for micro-batch 1 / 2 / 4, about 10 SR
    # standard deviations apart, while `backward` and `sr` agree within noise). What must not come back is
    # the per-micro-batch estimate, off by sqrt(micro-batches): at least sqrt(2) between these layouts.
    means = [statistics.mean(p["all"] for p in ps) for ps in table.values()]
    assert max(means) / min(means) < 1.2, means


def test_probe_and_bf16_eval_change_no_loss():
    """Same seed, same batches, 4 steps: probing the next batch and evaluating (quantized and BF16) after
    every step gives the losses of a run that does neither. With overlap_grad_reduce and 4 micro-batches,
    so a grad sync that the schedule's own no_sync would let through on the last micro-batch shows."""
    batches = [mock_batches(4, 1, 256, 4096, seed=s) for s in range(5)]

    def run(probe: bool) -> list[float]:
        engine = engine_for("nvfp4_fp4all", overrides={"parallel": {"overlap_grad_reduce": True}})
        losses = []
        for step in range(4):
            engine.begin_step(step + 1)
            losses.append(engine.train_step(batches[step], lr=1e-3).loss)
            if probe:
                engine.probe_quantization_noise(batches[step + 1], step + 1)
                engine.eval_loss(batches[4], quantized=False)
                engine.eval_loss(batches[4])
        dispose(engine)
        return losses

    probed, plain = run(True), run(False)
    record("probe_no_side_effect", {"probed": probed, "plain": plain})
    assert probed == pytest.approx(plain, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("precision", ["nvfp4_fp4all", "fp8_cs"])
def test_bf16_eval_is_a_bf16_engine_on_the_same_weights(precision):
    """eval_loss(quantized=False) runs the same BF16 weights through TE without its FP8/FP4 autocast
    (emulated nvfp4_fp4all; fp8_cs native on Hopper and newer): a bf16 engine loaded with those weights
    runs the same TE BF16 kernels, so the losses agree to BF16 rounding of the reductions at most."""
    batches = mock_batches(2, 2, 256, 4096, seed=7)
    engine = engine_for(precision)
    engine.begin_step(1)
    engine.train_step(mock_batches(2, 2, 256, 4096), lr=1e-3)
    quantized = engine.eval_loss(batches)
    bf16_forward = engine.eval_loss(batches, quantized=False)
    again = engine.eval_loss(batches)
    weights = engine.reference_state_dict()
    dispose(engine)
    reference = engine_for("bf16")
    reference.load_reference_state_dict(weights)
    expected = reference.eval_loss(batches)
    dispose(reference)
    record(f"bf16_eval_{precision}", {"quantized": quantized, "bf16": bf16_forward, "bf16_engine": expected})
    assert again == quantized  # the quantized forward is back
    assert bf16_forward != quantized
    assert bf16_forward == pytest.approx(expected, rel=1e-3)


def test_skips_non_finite_update():
    engine = engine_for()
    batches = mock_batches(1, 2, 256, 4096)
    engine.train_step(batches, lr=1e-3)
    with torch.no_grad():
        next(engine.models[0].parameters()).fill_(float("nan"))  # poison the embedding
    r = engine.train_step(batches, lr=1e-3)
    assert r.skipped
    dispose(engine)


@pytest.mark.parametrize("parallel", ["single", "megatron_8b"])
def test_checkpoint_exact_resume(tmp_path, parallel):
    """Save after 2 steps; a fresh engine that loads it repeats steps 3-4 of the uninterrupted run."""
    batches = [mock_batches(2, 2, 256, 4096, seed=s) for s in range(4)]
    engine = engine_for("bf16", parallel)
    for b in batches[:2]:
        engine.train_step(b, lr=1e-3)
    engine.save(tmp_path)
    straight = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]
    dispose(engine)

    engine = engine_for("bf16", parallel, overrides={"train": {"seed": 99}})  # different init, then load
    engine.load(tmp_path)
    resumed = [engine.train_step(b, lr=1e-3).loss for b in batches[2:]]
    dispose(engine)
    record(f"resume_{parallel}", {"uninterrupted": straight, "resumed": resumed})
    assert (tmp_path / "megatron" / "metadata.json").is_file()
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-6)


def test_missing_checkpoint_is_one_line(tmp_path):
    from llmtrain.errors import CheckpointError

    engine = engine_for()
    with pytest.raises(CheckpointError, match="no Megatron-Core checkpoint"):
        engine.load(tmp_path)
    dispose(engine)


def _phase(recipe, **changes):
    from llmtrain.precision.phases import apply_changes

    return apply_changes(recipe, [(op, change) for op, change in changes.items()])


def test_emulated_phase_switch_changes_the_recipe_every_te_linear_uses():
    """precision.schedule on the emulated back end: set_phase reaches the quantizers already built."""
    from llmtrain.precision import PrecisionRecipe, te_custom

    engine = engine_for("nvfp4_fp4all")
    batches = mock_batches(2, 2, 256, 4096)
    engine.begin_step(1)
    engine.train_step(batches, lr=1e-3)
    base = engine.base_recipe
    quantized = engine.eval_loss(batches)
    assert engine.eval_loss(batches) == quantized  # round-to-nearest forward: deterministic
    fwd_bf16 = _phase(base, fprop_x={"format": "bf16"}, fprop_w={"format": "bf16"})
    engine.set_phase(fwd_bf16)
    assert te_custom.STATE.recipe == fwd_bf16
    high = engine.eval_loss(batches)
    engine.set_phase(PrecisionRecipe())  # every operand in high precision
    all_hp = engine.eval_loss(batches)
    state = engine.reference_state_dict()
    engine.begin_step(2)
    r = engine.train_step(batches, lr=1e-3)  # trains with nothing quantized
    engine.set_phase(base)
    back = engine.eval_loss(batches)
    record(
        "phase_switch_nvfp4_fp4all",
        {"quantized": quantized, "fwd_bf16": high, "all_hp": all_hp, "back": back},
    )
    assert high != quantized and high == all_hp  # eval runs the forward only
    assert math.isfinite(r.loss) and not r.skipped and back != high
    dispose(engine)
    # With every operand in high precision the emulated forward is TE's BF16 forward of the same weights.
    bf16 = engine_for("bf16")
    bf16.load_reference_state_dict(state)
    bf16_loss = bf16.eval_loss(batches)
    dispose(bf16)
    record("phase_all_hp_vs_bf16", {"all_hp": all_hp, "bf16": bf16_loss})
    assert all_hp == pytest.approx(bf16_loss, rel=1e-3)


def test_native_fp8_phases_use_backward_override_and_bf16():
    """Native TE: a QAF phase sets backward_override="high_precision" on the recipe Megatron builds, an
    all-BF16 phase turns Megatron's FP8 context off; both train. Needs TE >= 2.20 for the first part."""
    from megatron.core import fp8_utils

    from llmtrain.engines.megatron_engine.engine import _te_backward_override_available
    from llmtrain.precision import PrecisionRecipe

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    engine = engine_for("fp8_cs", overrides={"precision": {"bf16_layers": {"first": 0, "last": 0}}})
    assert "emulated" not in engine.backend_description
    batches = mock_batches(2, 2, 256, 4096)
    engine.train_step(batches, lr=1e-3)
    base = engine.base_recipe
    results = {}
    if _te_backward_override_available():
        qaf = _phase(base, **{n: {"format": "bf16"} for n in ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")})
        engine.set_phase(qaf)
        assert fp8_utils.get_fp8_recipe(engine.config).backward_override == "high_precision"
        results["qaf"] = engine.train_step(batches, lr=1e-3)
    fp8_loss = engine.eval_loss(batches)
    engine.set_phase(PrecisionRecipe())
    assert engine.config.fp8 is None
    bf16_loss = engine.eval_loss(batches)
    results["bf16"] = engine.train_step(batches, lr=1e-3)
    engine.set_phase(base)
    assert engine.config.fp8 == "hybrid" and fp8_utils.get_fp8_recipe(engine.config).backward_override is None
    record("native_phases_fp8_cs", {"fp8_eval": fp8_loss, "bf16_eval": bf16_loss,
                                    **{k: v.loss for k, v in results.items()}})  # fmt: skip
    assert fp8_loss != bf16_loss and all(math.isfinite(v.loss) and not v.skipped for v in results.values())
    dispose(engine)


def test_native_refuses_a_phase_te_cannot_express():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    over = {"precision": {"backend": "native", "schedule": [{"name": "fwd", "trigger": "step", "at": 5,
                                                             "set": {"fprop": "bf16"}}]}}  # fmt: skip
    with pytest.raises(UserError, match=r"precision\.schedule\.0 \(fwd: .*use precision\.backend=custom"):
        engine_for("fp8_cs", overrides=over)


def test_cli_run_ends_cleanly_and_keeps_library_warnings_off_the_console(tmp_path):
    """Issue 16.13: no NCCL `destroy_process_group() was not called` at exit; a library's Python warning is
    one `warning (module): ...` line on the console at most, in full in <run>/train.log."""
    import re

    from tests.helpers import FAST, run_cli

    proc = run_cli(*FAST, "engine=megatron", "train.steps=3", f"hydra.run.dir={tmp_path}", check=True)
    console = proc.stdout + proc.stderr
    assert "destroy_process_group() was not called" not in console, console[-3000:]
    assert not re.search(r"\.py:\d+: \w*Warning: ", console), console[-3000:]  # no full-format warning
    short = [line for line in proc.stderr.splitlines() if line.startswith("warning (")]
    assert len(short) == len(set(short)), short
    assert (tmp_path / "train.log").is_file()
    print(f"{len(short)} library warnings on the console; train.log:\n{(tmp_path / 'train.log').read_text()}")


def test_dispose_frees_the_engine_while_the_caller_still_holds_it():
    """bench.py and these tests build engines one after another in one process. The model chunks reference
    each other (config hooks, DDP), so before close() dropped the engine's references the previous engine's
    weights and FP32 gradient buffer stayed allocated through the next engine's run (the H100 bench's
    llmtrain FP8-CS cell peaked 7.4 GiB above the bare loop's after its BF16 cell)."""
    import gc

    wide = {"model": {"hidden_size": 1024, "ffn_hidden_size": 4096, "num_attention_heads": 16}}
    batches = mock_batches(2, 2, 256, 4096)
    warm = engine_for("bf16", overrides=wide)  # TE's and cuBLAS's process-wide workspaces exist after it
    warm.train_step(batches, lr=1e-3)
    dispose(warm)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = engine_for("bf16", overrides=wide)
    engine.train_step(batches, lr=1e-3)
    held = torch.cuda.memory_allocated() - before
    dispose(engine)  # `engine` is still bound in this frame
    left = torch.cuda.memory_allocated() - before
    record("dispose_frees_memory", {"held_mib": held / 2**20, "left_mib": left / 2**20})
    assert held > 2**29  # ~69M parameters x 18 B: weights, FP32 grads, master weights and Adam moments
    assert left <= 0.01 * held, (held, left)

"""dry_run=measure on the CPU: its one-line refusals, its byte accounting and its report; the per-stage
memory estimate; the low-precision parameter all-gather's switch. The measurement itself: tests/gpu."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.config.estimate import (
    GIB,
    estimate_memory,
    layers_in_flight,
    layers_on_stage,
    layout_of,
    lowp_param_gather_planned,
)
from llmtrain.engines.megatron_engine import measure, param_gather
from llmtrain.errors import ConfigError, UserError
from llmtrain.models import ModelSpec
from tests.helpers import run_cli_in_process
from tests.megatron_helpers import make_config

HOPPER, BLACKWELL = (9, 0), (10, 0)


def cfg_8b(precision="fp8_cs", **parallel):
    return make_config("llama3_8b", precision, "megatron_8b", {"parallel": parallel} if parallel else None)


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cli_without_cuda_refuses_in_one_line():
    proc = run_cli_in_process("recipe=llama3_8b", "precision=fp8_cs", "parallel.tp=2", "cluster.gpus_per_node=8",
                              "dry_run=measure", "hydra.run.dir=/tmp/llmtrain-test-measure",
                              "hydra.output_subdir=null")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert lines == [
        "error: dry_run=measure builds one rank for real and needs a CUDA GPU; on this machine use "
        "dry_run=true (the estimate only)"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ({"measure": {"rank": 8}}, 8, "measure.rank=8: the planned world has ranks 0..7"),
        ({"measure": {"rank": -2}}, 8, "measure.rank=-2: the planned world has ranks 0..7"),
        ({"engine": {"name": "torch"}}, 8, "dry_run=measure measures the Megatron engine"),
        ({"measure": {"steps": 0}}, 8, "measure.steps=0: must be >= 1"),
        ({"dry_run": "yes"}, 8, "dry_run='yes': not a valid choice (allowed: False, True, measure)"),
        ({"train": {"device": "cpu"}}, 8, "dry_run=measure runs on a CUDA GPU"),
    ],
)
def test_bad_requests_are_one_config_error(overrides, world, message):
    cfg = OmegaConf.merge(cfg_8b(), {"dry_run": "measure"}, overrides)
    engine = "torch" if cfg.engine.name == "torch" else "megatron"
    with pytest.raises(ConfigError) as err:
        measure.check_request(cfg, world, engine)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_under_torchrun_it_refuses(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = OmegaConf.merge(cfg_8b(), {"dry_run": "measure"})
    with pytest.raises(UserError, match="emulates the whole world in one process"):
        measure.check_request(cfg, 8, "megatron")


@pytest.mark.parametrize("world, rank", [(8, 3), (1, 0)])
def test_the_fake_group_comes_from_llmtrain_dist_and_is_gone_after(monkeypatch, world, rank):
    """The rank is measured under torch's fake process group of the planned world (one rank too), created
    by llmtrain.dist.init_process_group and destroyed when the measurement ends."""
    seen = {}

    def fake_measure(cfg, w, r):
        dist = torch.distributed
        seen.update(backend=dist.get_backend(), rank=dist.get_rank(), world=dist.get_world_size())
        return {}

    monkeypatch.setattr(measure, "check_request", lambda cfg, w, engine: rank)
    monkeypatch.setattr(measure, "_measure", fake_measure)
    measure.measure(None, world)
    assert seen == {"backend": "fake", "rank": rank, "world": world}
    assert not torch.distributed.is_initialized()


def test_rank_minus_one_is_the_last_rank():
    assert measure.resolve_rank(-1, 16) == 15 and measure.resolve_rank(3, 16) == 3


def test_default_micro_batches_fill_the_interleaved_warmup():
    for pp in (2, 4, 8):
        for vpp in (1, 2, 4):
            m = measure.default_micro_batches(10_000, pp)
            warmup_rank0 = (pp - 1) * 2 + (vpp - 1) * pp if vpp > 1 else pp - 1
            assert m * vpp >= warmup_rank0 + 1 and m % pp == 0
    assert measure.default_micro_batches(10_000, 1) == 2 and measure.default_micro_batches(1, 4) == 1


# ---- byte accounting -------------------------------------------------------------------------------------
def test_storage_bytes_counts_each_buffer_once():
    buf = torch.zeros(1000, dtype=torch.float32)
    a, b = buf[:400].view(20, 20), buf[400:]
    other = torch.zeros(10, dtype=torch.bfloat16)
    seen: set = set()
    assert measure.storage_bytes([a, b, other], seen) == 4000 + 20
    assert measure.storage_bytes([b], seen) == 0  # already counted under another category


def test_storage_bytes_counts_a_wrapper_subclass_by_its_inner_tensors():
    class Quantized(torch.Tensor):  # what TE's QuantizedTensor looks like to the accounting
        @staticmethod
        def __new__(cls, data, transpose):
            t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.bfloat16)
            t._data, t._transpose = data, transpose
            return t

        def __tensor_flatten__(self):
            return ["_data", "_transpose"], None

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError

    q = Quantized(torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8))
    assert measure.storage_bytes([q], set()) == 128  # not 8*8*2 (its BF16 "fake" dtype)
    # TE's transpose is the estimate's low-precision weight copy, not the parameter
    assert measure.storage_bytes([q], set(), columnwise=False) == 64
    assert measure.storage_bytes([q], set(), columnwise=True) == 64


# ---- report ----------------------------------------------------------------------------------------------
def _result(ok=True):
    est = {"weights": 10.0, "weight_copies": 1.0, "grads": 20.0, "optimizer": 5.0, "activations": 30.0,
           "logits": 0.0, "total": 66.0}  # fmt: skip
    r = {"model": "llama3_8b", "precision": "fp8_cs", "world": 8, "rank": 0, "tp": 2, "pp": 1, "vpp": 1,
         "cp": 1, "dp": 4, "stage": 0, "gpu": "NVIDIA H200", "gpu_gib": 139.8, "capability": "sm_90",
         "steps": 2, "micro_batches_per_step": 2, "micro_batch_size": 1, "seq_length": 8192,
         "estimate": est, "ok": ok, "phase": "done" if ok else "step 1"}  # fmt: skip
    if ok:
        r.update(measured={"weights": 10.0, "weight_copies": 1.0, "other_resident": 0.5, "copies_and_other": 1.5,
                           "grads": 20.0, "optimizer": 5.0,
                           "activations": 25.0, "peak": 61.5, "reserved": 64.0, "last_step_peak": 61.5},
                 optimizer_state_allocated=True, compute_s_per_step=1.0, backend="Megatron-Core x")  # fmt: skip
    else:
        r.update(oom=True, error="CUDA out of memory.", peak_before_oom_gib=70.2)
    return r


def test_report_puts_each_component_next_to_its_estimate_and_says_what_is_not_real():
    text = measure.report(_result())
    assert "NOT REAL: losses and communication" in text
    assert "  weights             10.00     10.00     +0%" in text
    assert "  activations         30.00     25.00    +20%" in text
    assert "  peak                66.00     61.50     +7%" in text
    assert "estimate within 10% of the measured peak" in text


def test_report_of_an_oom_says_it_does_not_build():
    text = measure.report(_result(ok=False))
    assert "does NOT build here: out of GPU memory at step 1 (peak 70.2 GiB; estimate 66.0 GiB)" in text


# ---- per-stage estimate ----------------------------------------------------------------------------------
def test_layers_on_stage_partition_the_model_as_megatron_interleaves_them():
    assert layers_on_stage(8, 2, 2, 0) == [0, 1, 4, 5] and layers_on_stage(8, 2, 2, 1) == [2, 3, 6, 7]
    for pp, vpp in ((1, 1), (2, 1), (2, 4), (4, 2)):
        every = sorted(n for s in range(pp) for n in layers_on_stage(32, pp, vpp, s))
        assert every == list(range(32))


def test_layers_in_flight_follow_the_1f1b_warmup():
    assert layers_in_flight(32, 1, 1, 0, 64) == 32
    assert layers_in_flight(32, 2, 1, 0, 64) == 32 and layers_in_flight(32, 2, 1, 1, 64) == 16
    # interleaved pp=2 vpp=4: warm-up (2-0-1)*2 + 3*2 = 8 chunks (+1 in flight) of 4 layers
    assert layers_in_flight(32, 2, 4, 0, 64) == 36 and layers_in_flight(32, 2, 4, 1, 64) == 28
    assert layers_in_flight(32, 2, 4, 0, 1) == 16  # one micro-batch: its 4 chunks only


def test_pipeline_stages_split_logits_and_embeddings():
    cfg = cfg_8b("bf16", pp=2, vpp=4)
    lay = layout_of(cfg, 8)
    first, last = (estimate_memory(cfg, lay, "megatron", stage=s) for s in (0, 1))
    assert first.logits == 0 and last.logits > 0
    assert first.weights == last.weights  # embedding on one, untied output layer on the other
    spec = ModelSpec.from_config(cfg.model)
    # both stages together hold every parameter once, at 2 B each (the final norm aside)
    assert (first.weights + last.weights) / 2 == spec.num_params() - spec.hidden_size
    assert estimate_memory(cfg, lay, "megatron").total == max(first.total, last.total)


def test_low_precision_copies_skip_the_bf16_layers():
    base = cfg_8b("nvfp4")  # Bridge keeps the last 4 of 32 layers in BF16
    lay = layout_of(base, 8)
    linear = ModelSpec.from_config(base.model).layer_linear_params()
    native = estimate_memory(base, lay, "megatron", param_gather=False, emulated=False)
    assert native.weight_copies == pytest.approx(2 * 0.5625 * 28 * linear)  # row- and column-wise
    emulated = estimate_memory(base, lay, "megatron", param_gather=False, emulated=True)
    assert emulated.weight_copies == pytest.approx(4 * 28 * linear)  # two dequantized BF16 copies
    assert emulated.activations > native.activations  # emulation saves GEMM inputs in BF16


def test_lowp_param_gather_stores_quantized_layers_in_low_precision_only():
    cfg = cfg_8b("fp8_cs")  # Bridge keeps the first and last of 32 layers in BF16: 30 quantized
    lay = layout_of(cfg, 8)
    linear = ModelSpec.from_config(cfg.model).layer_linear_params()
    on, off = (estimate_memory(cfg, lay, "megatron", param_gather=g, emulated=False) for g in (True, False))
    assert off.weights - on.weights == pytest.approx(1.0 * 30 * linear)  # no BF16 weight, FP8 data instead
    assert off.weight_copies - on.weight_copies == pytest.approx(1.0 * 30 * linear)  # no row-wise copy
    assert (on.grads, on.optimizer, on.activations) == (off.grads, off.optimizer, off.activations)


def _proxy(precision: str, emulated: bool):
    over = {
        "model": {"num_layers": 4},
        "train": {"global_batch_size": 4, "micro_batch_size": 1},
        "precision": {"bf16_layers": {"first": 0, "last": 0}},
    }  # fmt: skip  (as measured: all 4 quantized)
    cfg = make_config("llama3_8b", precision, "megatron_8b", over)
    return estimate_memory(cfg, layout_of(cfg, 1), "megatron", param_gather=False, emulated=emulated)


def test_proxy_estimates_match_the_measured_gaps_to_bf16():
    """docs/benchmarks.md, 4-layer Llama 3 8B proxy on an H200 (peak GiB): BF16 46.5, FP8-CS (native)
    47.4, MXFP8 and NVFP4 (emulated, all 4 layers quantized) 49.8 each."""
    bf16 = _proxy("bf16", False).total
    assert (_proxy("fp8_cs", False).total - bf16) / GIB == pytest.approx(0.9, abs=0.15)
    for precision in ("mxfp8", "nvfp4"):
        assert (_proxy(precision, True).total - bf16) / GIB == pytest.approx(3.3, abs=0.15)


def test_pp1_estimate_is_unchanged_for_bf16():
    """Regression: llama3_8b BF16 DP=8 as before the per-stage rewrite (104.9 GiB)."""
    cfg = cfg_8b("bf16")
    assert estimate_memory(cfg, layout_of(cfg, 8), "megatron").total / GIB == pytest.approx(104.9, abs=0.05)


# ---- low-precision parameter all-gather -------------------------------------------------------------------
@pytest.mark.parametrize(
    "precision, capability, on",
    [("fp8_cs", HOPPER, True), ("bf16", HOPPER, False), ("nvfp4", HOPPER, False), ("mxfp8", HOPPER, False),
     ("nvfp4", BLACKWELL, True), ("mxfp8", BLACKWELL, True)],
)  # fmt: skip
def test_auto_is_on_where_bridge_turns_it_on_and_te_runs_natively(precision, capability, on):
    cfg = cfg_8b(precision)
    assert param_gather.resolve(cfg.parallel, cfg.precision, capability, shards=8) is on


def test_auto_is_off_on_one_shard_where_nothing_is_gathered():
    """dp*cp=1: the all-gather moves nothing, and on one H100 at 1B TE's master-to-FP8 cast cost 68 ms/step
    (docs/benchmarks.md). Asked for explicitly it still runs there, as Bridge's recipes would."""
    cfg = cfg_8b("fp8_cs")
    assert param_gather.resolve(cfg.parallel, cfg.precision, HOPPER, shards=1) is False
    assert param_gather.resolve(cfg.parallel, cfg.precision, HOPPER, shards=2) is True
    assert lowp_param_gather_planned(cfg, 1) is False and lowp_param_gather_planned(cfg, 8) is True
    on = cfg_8b("fp8_cs", lowp_param_gather=True)
    assert param_gather.resolve(on.parallel, on.precision, HOPPER, shards=1) is True
    assert lowp_param_gather_planned(on, 1) is True


def test_auto_is_off_without_the_distributed_optimizer():
    cfg = cfg_8b("fp8_cs", distributed_optimizer=False)
    assert param_gather.resolve(cfg.parallel, cfg.precision, HOPPER, shards=8) is False


@pytest.mark.parametrize(
    "precision, parallel, message",
    [
        ("nvfp4", {}, "precision=nvfp4 runs emulated here (TE's native NVFP4BlockScaling needs compute"),
        ("fp8_cs", {"distributed_optimizer": False}, "it needs parallel.distributed_optimizer=true"),
        ("bf16", {}, "precision=bf16 keeps BF16 parameters"),
    ],
)
def test_asking_for_it_where_it_cannot_run_is_one_line(precision, parallel, message):
    cfg = cfg_8b(precision, lowp_param_gather=True, **parallel)
    with pytest.raises(UserError) as err:
        param_gather.resolve(cfg.parallel, cfg.precision, HOPPER, shards=8)
    assert str(err.value).startswith(f"parallel.lowp_param_gather=true: {message}")
    assert "\n" not in str(err.value)


def test_megatron_fields_are_bridges():
    fp8 = cfg_8b("fp8_cs").precision
    assert param_gather.megatron_kwargs(fp8, True) == (
        {"fp8_param": True},
        {"fp8_param_gather": True},
        {"fp8_recipe": "tensorwise"},
    )
    mx = cfg_8b("mxfp8").precision
    _, ddp, opt = param_gather.megatron_kwargs(mx, True)
    assert ddp["reuse_grad_buf_for_mxfp8_param_ag"] and opt["reuse_grad_buf_for_mxfp8_param_ag"]
    nv = cfg_8b("nvfp4").precision
    assert param_gather.megatron_kwargs(nv, True)[:2] == ({"fp4_param": True}, {"fp4_param_gather": True})
    assert param_gather.megatron_kwargs(fp8, False) == ({}, {}, {})


# ---- scripts/measure_layouts.py ----------------------------------------------------------------------------
def _layouts_script():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "measure_layouts.py"
    spec = importlib.util.spec_from_file_location("measure_layouts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layout_cases_start_with_llama3_8b_fp8_and_cover_every_stage():
    m = _layouts_script()
    cases = m.cases()
    assert [m.label(c) for c in cases[:2]] == [
        "llama3_8b TP2xDP4 fp8_cs first",
        "llama3_8b TP2xDP4 fp8_cs first [lowp_param_gather=false]",
    ]
    per_model = 3 * (len(m.LAYOUTS) + 1)  # precisions x (layouts + the second PP stage)
    assert len(cases) == 2 * per_model + 1
    assert {c["stage"] for c in cases if c["layout"].startswith("PP2")} == {"first", "last"}


def test_render_flags_rows_off_by_more_than_10_percent_and_failed_builds():
    m = _layouts_script()
    case = {"model": "llama3_8b", "precision": "fp8_cs", "layout": "TP2xDP4", "stage": "first"}
    ok = {**_result(), "case": case, "lowp_param_gather": True}
    ok["measured"] = {**ok["measured"], "peak": 50.0}  # estimate 66.0: +32%
    oom = {**_result(ok=False), "case": {**case, "layout": "DP8"}}
    text = m.render([ok, oom])
    assert "| llama3_8b | TP2xDP4 | fp8_cs | first (0) | yes | 66.0 | 50.0 | +32% **>10%** | True |" in text
    assert "| llama3_8b | DP8 | fp8_cs | first (0) | no (OOM) | 66.0 | 70.2 (at failure) |" in text
    assert "| llama3_8b | TP2xDP4 | fp8_cs | first | 10.0 / 10.0 | 1.0 / 1.5 | 20.0 / 20.0 |" in text


def test_render_of_several_sessions_keeps_one_row_per_case_the_latest_winning():
    m = _layouts_script()
    first, second = m.cases()[:2]
    failed = {**_result(ok=False), "case": first, "error": "NotImplementedError: a bug of ours"}
    rerun = {**_result(), "case": first}
    rows = m.latest_per_case([failed, {**_result(), "case": second}, rerun])
    assert rows == [rerun, {**_result(), "case": second}]  # first case keeps its place, with the re-run


def test_result_files_that_are_missing_or_malformed_are_one_line(tmp_path):
    m = _layouts_script()
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({**_result(), "case": m.cases()[0]}) + "\n\n")
    assert len(m._records([str(good)])) == 1
    cut = tmp_path / "cut.jsonl"
    cut.write_text(good.read_text().strip() + "\n" + '{"ok": true, "case": {"mod')  # killed mid-write
    for paths, expected in (
        ([str(tmp_path / "missing.jsonl")], "cannot read"),
        ([str(good), str(cut)], f"{cut}:2 is not a JSON record"),
    ):
        with pytest.raises(SystemExit) as exc:
            m._records(paths)
        assert expected in str(exc.value) and "\n" not in str(exc.value)
    other = tmp_path / "other.jsonl"
    other.write_text('{"step": 1, "loss": 2.0}\n')  # another tool's JSON lines
    with pytest.raises(SystemExit, match=r"other\.jsonl:1 has no 'case'"):
        m._records([str(other)])


def test_run_skips_cases_an_earlier_session_measured_or_found_out_of_memory(tmp_path, monkeypatch):
    m = _layouts_script()
    first, second, third = m.cases()[:3]
    earlier = tmp_path / "earlier.jsonl"
    records = [{"ok": True, "case": first}, {"ok": False, "oom": True, "case": second}]
    records.append({"ok": False, "error": "NotImplementedError", "case": third})  # a bug: measure again
    earlier.write_text("".join(json.dumps(r) + "\n" for r in records))
    ran = []
    monkeypatch.setattr(
        m, "run_case", lambda case, timeout, steps: ran.append(m.label(case)) or {"wall_s": 0}
    )
    args = SimpleNamespace(out=str(tmp_path / "out.jsonl"), only="", skip_done=str(earlier), budget=1e9,
                           min_case=0.0, timeout=1.0, steps=1, retry_oom=False)  # fmt: skip
    m.cmd_run(args)
    assert ran[0] == m.label(third) and len(ran) == len(m.cases()) - 2
    ran.clear()  # a larger GPU: the out-of-memory case runs again, the built one still does not
    m.cmd_run(SimpleNamespace(**{**vars(args), "retry_oom": True}))
    assert m.label(second) in ran and m.label(first) not in ran and len(ran) == len(m.cases()) - 1


def test_retry_oom_without_skip_done_is_one_error_line(capsys):
    m = _layouts_script()
    with pytest.raises(SystemExit) as exc:
        m.main(["run", "--retry-oom"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--retry-oom" in err and "--skip-done" in err

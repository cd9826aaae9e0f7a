"""scripts/bench.py and scripts/profile_step.py without a GPU: arguments, the cells and the commands each
runs (both loops see the same model), the markdown tables, and the profiler's kernel grouping."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
profile_step = _load("profile_step")
bare = _load("bench_bare_megatron")


def test_models_and_groups_in_run_order():
    args = bench.parse(["--model", "1b,proxy8b", "--precisions", "bf16,fp8_cs,nvfp4"])
    assert bench.groups(args) == [  # by default every cell is its own process
        ("1b", "llmtrain", ["bf16"]), ("1b", "llmtrain", ["fp8_cs"]), ("1b", "llmtrain", ["nvfp4"]),
        ("1b", "bare", ["bf16"]), ("1b", "bare", ["fp8_cs"]),
        ("proxy8b", "llmtrain", ["bf16"]), ("proxy8b", "llmtrain", ["fp8_cs"]), ("proxy8b", "llmtrain", ["nvfp4"]),
        ("proxy8b", "bare", ["bf16"]), ("proxy8b", "bare", ["fp8_cs"]),
    ]  # fmt: skip
    args = bench.parse(["--model", "1b,proxy8b", "--precisions", "bf16,fp8_cs,nvfp4", "--share-process"])
    assert bench.groups(args) == [
        ("1b", "llmtrain", ["bf16", "fp8_cs", "nvfp4"]), ("1b", "bare", ["bf16", "fp8_cs"]),
        ("proxy8b", "llmtrain", ["bf16", "fp8_cs", "nvfp4"]), ("proxy8b", "bare", ["bf16", "fp8_cs"]),
    ]  # fmt: skip
    assert bench.groups(bench.parse(["--precisions", "mxfp8", "--impls", "bare"])) == []


@pytest.mark.parametrize("argv", [["--model", "8b"], ["--model", "1b,70b"], ["--impls", "native"]])
def test_unknown_choice_is_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "allowed values are" in err


def test_bare_loop_and_llmtrain_get_the_same_model():
    args = bench.parse(["--model", "proxy8b,1b", "--profile", "--host-profile", "--traces", "/tmp/t",
                        "--trace-models", "1b", "--trace-precisions", "fp8_cs"])  # fmt: skip
    b = bare.parse(bench.group_command("bare", "1b", ["bf16", "fp8_cs"], args)[2:])
    assert (b.layers, b.hidden, b.ffn, b.heads, b.groups, b.kv_channels) == (16, 2048, 8192, 32, 8, 64)
    assert (b.tie, b.vocab, b.seq, b.mbs, b.mb, b.precisions, b.profile) == (
        True, 128256, 1024, 4, 4, "bf16,fp8_cs", True)  # fmt: skip
    assert (
        bare.trace_path(b, "fp8_cs").endswith("1b_fp8_cs_bare.json.gz") and bare.trace_path(b, "bf16") is None
    )
    b8 = bare.parse(bench.group_command("bare", "proxy8b", ["bf16"], args)[2:])
    assert (b8.layers, b8.hidden, b8.ffn, b8.kv_channels, b8.tie, b8.seq, b8.mbs, b8.mb) == (
        4, 4096, 14336, 128, False, 8192, 1, 4)  # fmt: skip
    assert bare.trace_path(b8, "fp8_cs") is None  # traces only for --trace-models
    worker = bench.parse(bench.group_command("llmtrain", "1b", ["bf16", "nvfp4"], args)[2:])
    assert worker.worker and worker.model == "1b" and worker.precisions == "bf16,nvfp4"
    assert worker.host_profile  # the llmtrain cells profile the host; the bare loop's parser has no such flag
    assert bench.shape_of(worker, "1b") == bench.shape_of(args, "1b")
    assert bench.trace_path(worker, "1b", "fp8_cs", "llmtrain").endswith("1b_fp8_cs_llmtrain.json.gz")
    assert bench.trace_path(worker, "1b", "nvfp4", "llmtrain") is None
    cfg = bench.make_cfg("1b", bench.shape_of(worker, "1b"), "nvfp4")
    assert (cfg.model.num_layers, cfg.model.seq_length, cfg.train.micro_batch_size) == (16, 1024, 4)
    assert cfg.train.global_batch_size == 16 and cfg.precision.bf16_layers.last == 0
    with pytest.raises(SystemExit):
        bare.parse(["--precisions", "bf16,nvfp4"])  # the bare loop runs TE's native recipes only


def test_a_group_reports_every_precision_even_when_its_process_fails(monkeypatch):
    args = bench.parse(["--model", "1b", "--group-timeout", "5"])
    ok = {"impl": "bare-megatron-core", "precision": "bf16", "step_time_s": 1.0}

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(
            cmd, 1, "noise\nBENCH_RESULT " + json.dumps(ok) + "\n", "CUDA error"
        )

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    rows = bench.run_group("bare", "1b", ["bf16", "fp8_cs"], args)
    assert rows[0] == {"model": "1b", **ok}
    assert (
        rows[1]["precision"] == "fp8_cs"
        and rows[1]["error"].startswith("rc=1")
        and "CUDA error" in rows[1]["error"]
    )

    def timeout(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, 5, output=b"BENCH_RESULT " + json.dumps(ok).encode() + b"\n")

    monkeypatch.setattr(bench.subprocess, "run", timeout)
    rows = bench.run_group("bare", "1b", ["bf16", "fp8_cs"], args)
    assert "error" not in rows[0] and rows[1]["error"].startswith("timed out after 5s")


def _row(model, precision, impl, step, **kw):
    r = {"model": model, "precision": precision, "impl": impl, "step_time_s": step, "tokens_per_step": 16384,
         "peak_mem_gib": 20.0, **kw}  # fmt: skip
    return bench.add_metrics(r, 1e10, 989.0)


def _meta():
    return {
        "gpu": "NVIDIA H200",
        "peak_tflops": 989.0,
        "timing": "5 timed steps after 2 warm-up",
        "models": {"1b": {"description": "llama3_1b", "flops_per_token": 1e10, "params": 1}},
        "nominal_hbm_gb_per_s": 4800.0,
        "kernels": {"tensor": "8192x4096 bf16", "copy_gb_per_s": 3600.0, "rows": [
            {"kernel": "mxfp8+rowwise", "ms": 0.05, "gb_per_s": 2520.0, "fraction_of_copy_bw": 0.7}]},
    }  # fmt: skip


CALLS = {"weight/rowwise": 64, "weight/columnwise": 64, "input/rowwise": 256, "grad_output/columnwise": 256}


def test_markdown_table_ratios_and_errors():
    rows = [
        _row("1b", "bf16", "llmtrain-megatron", 0.40),
        _row("1b", "bf16", "bare-megatron-core", 0.38),
        _row("1b", "fp8_cs", "llmtrain-megatron", 0.50),
        _row("1b", "nvfp4", "llmtrain-megatron", 0.60, quantize_calls_per_step=CALLS),
        {"model": "1b", "precision": "mxfp8", "impl": "llmtrain-megatron", "error": "rc=1: boom"},
    ]
    md = bench.markdown(rows, _meta())
    lines = {ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln for ln in md.splitlines()
             if ln.startswith("| ") and "---" not in ln}  # fmt: skip
    assert "1.053x time" in lines["bf16/llmtrain-megatron"]  # 0.40 / 0.38 vs bare
    assert "1.25x time" in lines["fp8_cs/llmtrain-megatron"]  # 0.50 / 0.40 vs BF16, same implementation
    assert "40,960" in lines["bf16/llmtrain-megatron"]  # 16384 tokens / 0.4 s
    assert "failed" in lines["mxfp8/llmtrain-megatron"] and "boom" in lines["mxfp8/llmtrain-megatron"]
    assert "| 1b | nvfp4 | 64 | 64 | 256 | 0 | 0 | 256 |" in md
    assert "| mxfp8+rowwise | 50 | 2,520 | 70% | 52% |" in md


def test_render_reads_the_results_file(tmp_path, capsys):
    prof = profile_step.group_trace(_trace()) | {"wall_ms_profiled": 1.0}
    slower = json.loads(json.dumps(prof))
    slower["categories"]["amax"]["ms"] += 2.0
    slower["busy_ms"] += 2.0
    rows = [
        _row("1b", "bf16", "llmtrain-megatron", 0.4, profile=prof),
        _row("1b", "fp8_cs", "llmtrain-megatron", 0.41, profile=slower),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": _meta(), "results": rows}))
    bench.main(["--render", str(path)])
    out = capsys.readouterr().out
    assert out == bench.markdown(rows, _meta())
    # step timed without the profiler (400 ms), GPU busy 0.151 ms, idle the rest; then the categories
    assert "| 1b | bf16 | llmtrain-megatron | 400.0 | 0.2 | 399.8 | 0.0 (13%) | 0.0 (3%) | 0.1 (64%) |" in out
    # the difference to BF16: +10 ms step, +2 ms busy (all of it amax), +8 ms idle
    assert "| 1b | fp8_cs - bf16 | llmtrain-megatron | +10.0 | +2.0 | +8.0 | +0.0 | +2.0 | +0.0 |" in out


KERNELS = {
    "void transformer_engine::(anonymous namespace)::amax_kernel<8, __nv_bfloat16>(...)": "amax",
    "_amax_kernel": "amax",
    "_fake_quant_kernel": "quantize",
    "void transformer_engine::detail::cast_transpose_general_kernel<...>": "quantize",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "gemm",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT": "gemm",
    "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, cutlass::bfloat16_t>>": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1": "attention",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>": "cast",
    "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float, float, long>>": "optimizer",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
    "void transformer_engine::normalization::rmsnorm_fwd_tuned_kernel<...broadcast...>": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
}  # fmt: skip


@pytest.mark.parametrize("name,category", list(KERNELS.items()))
def test_classify_kernel_names(name, category):
    assert profile_step.classify(name) == category


def _trace():
    def k(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    return {"traceEvents": [
        k("Memcpy HtoD (Pageable -> Device)", 0, 10, "gpu_memcpy"),
        k("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn", 10, 100),
        k("_fake_quant_kernel", 105, 20),  # overlaps the GEMM on another stream: 110..125 counted once
        k("_amax_kernel", 130, 5),
        k("rmsnorm_fwd", 135, 5),
        {"ph": "X", "cat": "gpu_user_annotation", "name": profile_step.OPTIMIZER_MARK, "ts": 200, "dur": 50},
        k("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", 210, 10),  # in the optimizer
        k("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", 300, 4),  # a cast
        k("Memset (Device)", 310, 2, "gpu_memset"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999},  # host side: ignored
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0},
    ]}  # fmt: skip


def test_group_trace_sums_per_category_and_marks_the_optimizer():
    g = profile_step.group_trace(_trace())
    ms = {c: v["ms"] for c, v in g["categories"].items()}
    assert ms == pytest.approx({"quantize": 0.020, "amax": 0.005, "gemm": 0.100, "attention": 0.0, "cast": 0.004,
                                "optimizer": 0.010, "communication": 0.0, "data": 0.010, "other": 0.007})  # fmt: skip
    assert g["kernel_ms"] == pytest.approx(0.156)
    assert g["busy_ms"] == pytest.approx((125 + 10 + 10 + 4 + 2) / 1e3)  # 0..125, 130..140, then 3 alone
    assert sum(v["share"] for v in g["categories"].values()) == pytest.approx(1.0)
    assert g["optimizer_marked"] and g["top_kernels"][0]["category"] == "gemm"
    # Without the annotation the copy inside the optimizer step counts as a cast.
    plain = profile_step.group_trace(
        [e for e in _trace()["traceEvents"] if e["cat"] != "gpu_user_annotation"]
    )
    assert plain["categories"]["cast"]["ms"] == pytest.approx(0.014) and not plain["optimizer_marked"]
    # Or by launch: the kernel launched (correlation id) inside the host-side range.
    host = [e for e in _trace()["traceEvents"] if e["cat"] != "gpu_user_annotation"]
    host[6] = {**host[6], "args": {"correlation": 42}}  # the copy at 300 us
    host += [{"ph": "X", "cat": "user_annotation", "name": profile_step.OPTIMIZER_MARK, "ts": 280, "dur": 5},
             {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 282, "dur": 1,
              "args": {"correlation": 42}}]  # fmt: skip
    assert host[6]["ts"] == 300
    by_launch = profile_step.group_trace(host)
    assert by_launch["optimizer_marked"]
    assert by_launch["categories"]["optimizer"]["ms"] == pytest.approx(0.004)
    assert by_launch["categories"]["cast"]["ms"] == pytest.approx(0.010)


def test_profile_one_step_marks_the_optimizer_step_and_restores_it(tmp_path):
    """On the CPU: no kernels, but the export, the optimizer marker and the trace file work end to end."""
    import gzip

    import torch

    layer = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(layer.parameters())

    def step():
        layer(torch.randn(4, 8)).sum().backward()
        opt.step()

    trace, original = tmp_path / "t.json.gz", opt.step
    out = profile_step.profile_one_step(step, opt, str(trace))
    assert out["kernel_ms"] == 0.0 and out["wall_ms_profiled"] > 0
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == profile_step.OPTIMIZER_MARK for e in events)
    assert opt.step == original  # the marker is gone


def test_time_steps_reports_the_median_and_the_garbage_collectors_share(monkeypatch):
    """On a fake clock: steps of 10, 90 and 20 ms give the median 20 ms whatever the slow step; a GC pass
    of 5 ms inside the second step counts 5/3 ms per step."""
    import gc
    import time

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    durations = iter([0.010, 0.090, 0.020])

    def step():
        d = next(durations)
        if d == 0.090:  # a collection in the middle of this step, as the gc module reports it
            for cb in list(gc.callbacks):
                cb("start", {})
            clock[0] += 0.005
            for cb in list(gc.callbacks):
                cb("stop", {})
            d -= 0.005
        clock[0] += d

    before = list(gc.callbacks)
    t = profile_step.time_steps(step, 3)
    assert t["step_time_s"] == pytest.approx(0.020)
    assert (t["step_time_min_s"], t["step_time_max_s"]) == pytest.approx((0.010, 0.090))
    assert t["step_times_s"] == pytest.approx([0.010, 0.090, 0.020])
    assert t["gc_ms_per_step"] == pytest.approx(5.0 / 3)
    assert gc.callbacks == before  # the hook is gone


def test_the_parent_process_never_touches_cuda(monkeypatch, tmp_path):
    """A CUDA context in bench.py's own process (1.86 GiB in the H100 run's OOM messages) stays on the GPU
    while every cell runs in a child; the GPU's name and the kernel timings come from children too."""
    import torch

    def no_cuda(*a, **k):
        raise AssertionError("bench.py's parent process touched CUDA")

    for name in ("is_available", "get_device_name", "empty_cache", "init", "synchronize", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    kernels = {"tensor": "8192x4096 bf16", "copy_gb_per_s": 3000.0, "rows": []}
    cell = {"impl": "llmtrain-megatron", "precision": "bf16", "step_time_s": 0.5, "tokens_per_step": 16384,
            "peak_mem_gib": 30.0}  # fmt: skip
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        if cmd[1] == "-c":
            out = "NVIDIA H100 80GB HBM3\n"
        elif "--kernels-worker" in cmd:
            out = "BENCH_KERNELS " + json.dumps(kernels) + "\n"
        else:
            out = "BENCH_RESULT " + json.dumps(cell) + "\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--model", "1b", "--impls", "llmtrain", "--precisions", "bf16", "--kernels",
                "--out", str(out), "--md", str(md)])  # fmt: skip
    meta = json.loads(out.read_text())["meta"]
    assert meta["gpu"] == "NVIDIA H100 80GB HBM3" and meta["kernels"] == kernels
    assert any("--kernels-worker" in c for c in commands) and any("--worker" in c for c in commands)


def test_new_timing_columns_and_old_results_files():
    new = _row("1b", "bf16", "llmtrain-megatron", 0.40, step_time_min_s=0.39, step_time_max_s=0.52,
               resident_mem_gib=12.25, gc_ms_per_step=1.5, host_op_us=0.95)  # fmt: skip
    old = _row("1b", "bf16", "bare-megatron-core", 0.38)  # a results file from before: no such keys
    md = bench.markdown([new, old], _meta())
    assert "| bf16 | llmtrain-megatron | 0.400 | 0.390-0.520 | 40,960 |" in md
    assert "| 20.0 | 12.2 | 1.5 | 0.95 | 1.053x time |" in md
    assert "| bf16 | bare-megatron-core | 0.380 |  | 43,116 |" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| precision"))
    failed = bench.markdown([{"model": "1b", "precision": "mxfp8", "impl": "x", "error": "boom"}], _meta())
    row = next(ln for ln in failed.splitlines() if "failed" in ln)
    assert row.count("|") == header.count("|")


def test_a_cell_that_starts_with_memory_allocated_is_named():
    rows = [
        _row("1b", "bf16", "llmtrain-megatron", 0.40, start_mem_gib=0.0),
        _row("1b", "fp8_cs", "llmtrain-megatron", 0.50, start_mem_gib=6.9),
    ]
    md = bench.markdown(rows, _meta())
    assert (
        "earlier cell of their process (their peak includes it): 1b fp8_cs llmtrain-megatron 6.9 GiB." in md
    )
    assert "bf16 llmtrain-megatron 0.0" not in md


def test_host_package_names_the_last_known_package_in_the_path():
    hp = profile_step.host_package
    assert hp("/opt/gpu-site/transformer_engine/pytorch/tensor/hybrid_tensor.py") == "transformer_engine"
    assert hp("/usr/lib/python3.12/site-packages/torch/nn/modules/module.py") == "torch"
    assert hp("/root/repo/llmtrain/precision/te_custom.py") == "llmtrain"
    assert hp("/opt/gpu-site/megatron/core/transformer/module.py") == "megatron"
    assert hp("/work/torch/llmtrain/x.py") == "llmtrain"  # the innermost package wins
    assert hp("~") == "builtin" and hp("/usr/lib/python3.12/json/decoder.py") == "other"


def test_host_profile_adds_up_a_step_by_package():
    """A step that spends its time in one of our functions (a stand-in in this test module counts as
    "other") and in torch: both show, the own times add up to no more than the wall time, and the busiest
    function leads the top list."""
    import torch

    def busy():
        total = 0
        for i in range(200_000):
            total += i
        return total

    def step():
        busy()
        torch.nn.functional.relu(torch.randn(64, 64))

    out = profile_step.host_profile_one_step(step, top=5)
    own = out["own_ms_by_package"]
    assert own["other"] > 0 and sum(own.values()) <= out["wall_ms_cprofile"] * 1.05 + 1.0
    assert len(out["top"]) == 5 and out["top"][0]["function"].endswith(":busy")
    table = profile_step.host_markdown([{"model": "1b", "precision": "nvfp4", "impl": "llmtrain-megatron",
                                         "host_profile": out}, {"precision": "bf16", "impl": "bare"}])  # fmt: skip
    assert table.count("\n") == 3 and "| 1b | nvfp4 | llmtrain-megatron |" in table

#!/usr/bin/env bash
# The GPU-side checks, run on a GPU host once Transformer Engine, Megatron-Core and Hydra are installed
# (offline kit: ../shared/gpu-host/README.md; they land in /opt/gpu-site). Results go under $OUT.
#
#   OUT=gpu-results bash scripts/gpu_check.sh tests          # kernels natively, then pytest -m gpu tests/gpu
#   OUT=gpu-results bash scripts/gpu_check.sh bench          # 8B proxy + 1B benchmark and profile (<= 9 min)
#   OUT=gpu-results bash scripts/gpu_check.sh cache          # weight quantized once per step; GEMM rounding
#   OUT=gpu-results bash scripts/gpu_check.sh train1b        # 1B bf16 vs nvfp4 on real data through the CLI
#
# Every stage has its own time limit, so one that hangs or fails leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=/opt/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # never NVLink multicast on shared hosts
py=${PYTHON:-python3}

stage_tests() {
  { nvidia-smi -L; $py -c "import torch, triton, transformer_engine.pytorch, transformer_engine as te, megatron.core as mc
print('torch', torch.__version__, 'triton', triton.__version__, 'TE', te.__version__, 'Megatron-Core', mc.__version__,
      'cc', torch.cuda.get_device_capability())"; } >"$out/env.txt" 2>&1
  timeout "${KERNELS_TIMEOUT:-180}" $py -m pytest -q -rA tests/unit/test_triton_kernels.py >"$out/triton_kernels.log" 2>&1
  echo "triton kernels: rc=$?" >>"$out/env.txt"
  # GPU_TESTS / GPU_TESTS_K narrow the run, e.g. GPU_TESTS=tests/gpu/test_megatron_engine.py GPU_TESTS_K=emulated
  LLMTRAIN_TEST_RESULTS=$out/gpu_results.jsonl LLMTRAIN_PARITY_REPORT=$out/te_parity.json \
    timeout "${TESTS_TIMEOUT:-330}" $py -m pytest -m gpu -q -rA -s --durations=15 ${GPU_TESTS:-tests/gpu} \
    ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} >"$out/gpu_tests.log" 2>&1
  echo "gpu tests: rc=$?" >>"$out/env.txt"
}

stage_bench() {
  # Both sizes, all four precisions, each next to the bare Megatron-Core loop (bf16, fp8_cs), one profiled
  # step per cell (Chrome traces kept for the 1B model's bf16, fp8_cs and mxfp8 cells), the quantize kernels'
  # bandwidth. Results are written after every cell; render them with:
  #   python scripts/bench.py --render "$out/bench.json"
  timeout "${BENCH_TIMEOUT:-520}" $py scripts/bench.py --model 1b,proxy8b --precisions bf16,fp8_cs,mxfp8,nvfp4 \
    --profile --traces /tmp/llmtrain-traces --trace-models 1b --trace-precisions bf16,fp8_cs,mxfp8 --kernels \
    --steps "${BENCH_STEPS:-10}" --warmup 2 --group-timeout 300 --out "$out/bench.json" --md "$out/bench.md" \
    >"$out/bench.log" 2>&1
  echo "bench: rc=$?" >>"$out/bench.log"
  tar cf "$out/traces_1b.tar" -C /tmp llmtrain-traces 2>>"$out/bench.log"  # one file: few files come back
}

stage_cache() {
  # Emulated MXFP8/NVFP4 on the Megatron engine quantize each weight once per optimizer step.
  # And the torch engine's emulated GEMM rounds its output once, as TE's native GEMM.
  timeout "${CACHE_TIMEOUT:-90}" $py -m pytest -m gpu -q -rA -s tests/gpu/test_megatron_weight_cache.py \
    tests/gpu/test_gemm_emulation_gpu.py \
    >"$out/weight_cache.log" 2>&1
  echo "weight cache test: rc=$?" >>"$out/weight_cache.log"
}

stage_train1b() {
  # The 1B debug model on the shipped corpus through the CLI, bf16 vs nvfp4 (emulated on Hopper).
  for p in bf16 nvfp4; do
    timeout "${TRAIN_TIMEOUT:-150}" $py -m llmtrain recipe=llama3_1b engine=megatron precision=$p \
      model.seq_length=1024 train.global_batch_size=16 train.micro_batch_size=4 train.steps="${TRAIN_STEPS:-200}" \
      optim.warmup_steps=20 train.eval_interval=50 train.eval_steps=4 train.checkpoint_interval=100 \
      logging.console=plain logging.wandb.mode=disabled data.cache_dir=/tmp/llmtrain-cache \
      hydra.run.dir=/tmp/llmtrain-runs/1b-$p >>"$out/train1b.log" 2>&1
    echo "train1b $p: rc=$?" >>"$out/train1b.log"
    cp /tmp/llmtrain-runs/1b-$p/metrics.jsonl "$out/metrics_1b_$p.jsonl" 2>/dev/null
  done
}

for stage in "$@"; do
  "stage_$stage"
done

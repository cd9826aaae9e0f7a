#!/usr/bin/env bash
# The GPU-side checks, run on a GPU host once Transformer Engine, Megatron-Core and Hydra are installed
# (offline kit: ../shared/gpu-host/README.md; they land in /opt/gpu-site). Results go under $OUT.
#
#   OUT=gpu-results bash scripts/gpu_check.sh tests          # pytest -m gpu tests/gpu by file, kernels natively
#   GPU_GROUPS='parity engine cache measure' ... tests      # a subset (the seven groups' limits add to 27 min)
#   OUT=gpu-results bash scripts/gpu_check.sh bench          # 8B proxy + 1B benchmark and profile (<= 9 min)
#   OUT=gpu-results bash scripts/gpu_check.sh cache          # weight quantized once per step; GEMM rounding
#   OUT=gpu-results bash scripts/gpu_check.sh host           # host time of one emulated quantize call (~30 s)
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
  # One group per file, each with its own time limit, so a slow or hanging file leaves the others their
  # time (on a fresh host the first call also compiles TE's, Triton's and torch.compile's kernels: the
  # 2026-12-06 H100 run needed ~2.5 min for test_megatron_engine.py cold, 1.7 min warm). One summary line
  # per group in $out/summary.txt, the full logs beside it.
  { nvidia-smi -L; $py -c "import torch, triton, transformer_engine.pytorch, transformer_engine as te, megatron.core as mc
print('torch', torch.__version__, 'triton', triton.__version__, 'TE', te.__version__, 'Megatron-Core', mc.__version__,
      'cc', torch.cuda.get_device_capability())"; } >"$out/summary.txt" 2>&1
  group() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" $py -m pytest -p no:cacheprovider -q -rA -s --durations=8 "$@" >"$out/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - start)) s: $(tail -1 "$out/$name.log")" >>"$out/summary.txt"
  }
  kernels() {
    # The kernels' bit-exactness tests, natively, in KERNELS_SHARDS processes at once: a cold host spends
    # most of their time compiling (50 of 66 in 220 s in one process on 2026-12-07), which is CPU work.
    local limit=$1 shards=${KERNELS_SHARDS:-4} start=$SECONDS i
    : >"$out/kernels.log" # the shards' logs are appended below: none of an earlier run's may remain
    $py -m pytest -p no:cacheprovider -q --collect-only tests/unit/test_triton_kernels.py 2>/dev/null |
      grep '::' >"$out/kernels_ids.txt"
    for ((i = 0; i < shards; i++)); do
      awk -v n="$shards" -v i="$i" 'NR % n == i' "$out/kernels_ids.txt" >"$out/kernels_ids_$i.txt"
      timeout "$limit" $py -m pytest -p no:cacheprovider -q -rA $(cat "$out/kernels_ids_$i.txt") \
        >"$out/kernels_$i.log" 2>&1 &
    done
    wait
    for ((i = 0; i < shards; i++)); do
      echo "kernels shard $i/$shards: $(tail -1 "$out/kernels_$i.log")" >>"$out/summary.txt"
      cat "$out/kernels_$i.log" >>"$out/kernels.log" && rm -f "$out/kernels_$i.log" "$out/kernels_ids_$i.txt"
    done
    echo "kernels: $(grep -c '^PASSED' "$out/kernels.log") passed of $(wc -l <"$out/kernels_ids.txt") in $((SECONDS - start)) s" >>"$out/summary.txt"
  }
  for g in ${GPU_GROUPS:-parity engine cache measure kernels rest new}; do # GPU_GROUPS: a subset, one call each
    case $g in
      parity) LLMTRAIN_PARITY_REPORT=$out/te_parity.json group parity 150 -m gpu tests/gpu/test_te_parity.py ;;
      engine) group engine 240 -m gpu tests/gpu/test_megatron_engine.py ;;
      cache) group cache "${CACHE_TIMEOUT:-260}" -m gpu tests/gpu/test_megatron_weight_cache.py tests/gpu/test_gemm_emulation_gpu.py ;;
      measure) group measure 150 -m gpu tests/gpu/test_measure.py ;;
      kernels) kernels "${KERNELS_TIMEOUT:-300}" ;;
      rest) group rest "${REST_TIMEOUT:-300}" -m gpu tests/gpu/test_megatron_parity.py \
        tests/gpu/test_torch_engine_gpu.py tests/gpu/test_convert_megatron.py ;;
      new) group new "${NEW_TIMEOUT:-240}" -m gpu tests/gpu/test_qwen3_megatron_parity.py \
        tests/gpu/test_megatron_async_checkpoint.py tests/gpu/test_nvfp4_options_gpu.py ;;
      *) echo "unknown GPU_GROUPS entry: $g" >>"$out/summary.txt" ;;
    esac
  done
}

stage_bench() {
  # Both sizes, all four precisions, each next to the bare Megatron-Core loop (bf16, fp8_cs), one profiled
  # step per cell (Chrome traces kept for the 1B model's bf16, fp8_cs and mxfp8 cells), the quantize kernels'
  # bandwidth. Every cell is its own process: one model per device call (BENCH_MODELS=1b, then
  # BENCH_MODELS=proxy8b) keeps a call inside 10 minutes. Results are written after every cell; render them:
  #   python scripts/bench.py --render "$out/bench.json"
  timeout "${BENCH_TIMEOUT:-520}" $py scripts/bench.py --model "${BENCH_MODELS:-1b,proxy8b}" \
    --precisions "${BENCH_PRECISIONS:-bf16,fp8_cs,mxfp8,nvfp4}" \
    --profile --host-profile --traces /tmp/llmtrain-traces --trace-models 1b --trace-precisions bf16,fp8_cs,mxfp8 --kernels \
    --steps "${BENCH_STEPS:-10}" --warmup 2 --group-timeout 150 --out "$out/bench.json" --md "$out/bench.md" \
    >"$out/bench.log" 2>&1
  echo "bench: rc=$?" >>"$out/bench.log"
  tar cf "$out/traces_1b.tar" -C /tmp llmtrain-traces 2>>"$out/bench.log"  # one file: few files come back
}

stage_cache() {
  # Emulated MXFP8/NVFP4 on the Megatron engine quantize each weight once per optimizer step.
  # And the torch engine's emulated GEMM rounds its output once, as TE's native GEMM.
  timeout "${CACHE_TIMEOUT:-260}" $py -m pytest -m gpu -q -rA -s tests/gpu/test_megatron_weight_cache.py \
    tests/gpu/test_gemm_emulation_gpu.py \
    >"$out/weight_cache.log" 2>&1
  echo "weight cache test: rc=$?" >>"$out/weight_cache.log"
}

stage_host() {
  # Host microseconds of one emulated quantize call, layer by layer (scripts/host_cost.py; issue 18).
  timeout "${HOST_TIMEOUT:-150}" $py scripts/host_cost.py --out "$out/host_cost.json" --md "$out/host_cost.md" \
    >"$out/host_cost.log" 2>&1
  echo "host_cost: rc=$?" >>"$out/host_cost.log"
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

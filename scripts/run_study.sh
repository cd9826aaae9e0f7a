#!/usr/bin/env bash
# GPU-host driver of the precision study (recipes/gpu_study.yaml, issue 17). Run from any directory:
#
#   OUT=/tmp/o bash scripts/run_study.sh measure            # tokens/s + MFU of the two model candidates
#   OUT=/tmp/o bash scripts/run_study.sh run                # corpus if missing, then every unfinished point
#   OUT=/tmp/o bash scripts/run_study.sh run bf16_s1 nvfp4_s1   # these points only, in this order
#   OUT=/tmp/o bash scripts/run_study.sh corpus             # the corpus only
#
# Every command stops by BUDGET seconds (default 560: the device allows 600 per command): a point still
# training then gets SIGTERM, saves a checkpoint and exits 0; the next call on the same host resumes it
# (.study/runs/POINT, train.resume=auto). A fresh host has no checkpoints: an unfinished point restarts.
# A point counts as finished when its metrics.jsonl reaches train.steps, in .study/runs/ or in
# docs/results/gpu/ (the results kept in the repo), and is skipped.
#
# Comes back under $OUT (at most 8 files): study_results.tar.gz = POINT/{metrics.jsonl,config.yaml,
# .hydra/overrides.yaml,train.log} for every point this call ran (finished or not) + corpus/{summary.json,
# sources.jsonl.gz,study.manifest.json}; run_study.log. Keep them with
#   tar -xzf study_results.tar.gz -C docs/results/gpu     # then commit docs/results/gpu
#
# Environment: BUDGET (s), PYTHON (python3), STUDY_OVERRIDES (extra Hydra overrides for every point, e.g.
# "model=study_85m hydra.sweep.dir=.study/runs_85m" -- give another sweep dir whenever the overrides change
# what a point trains, so no run resumes another's checkpoint), STUDY_NEW_CORPUS=1 (accept a corpus that
# differs from the one recorded in docs/results/gpu/corpus/summary.json), STUDY_CORPUS_ARGS (more
# arguments of build_study_corpus.py, e.g. "--roots DIR"), STUDY_DIR (instead of .study: corpus, caches,
# runs, logs; tests use it), MEASURE_MODELS / MEASURE_STEPS (measure: models, steps; STUDY_OVERRIDES apply).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${BUDGET:-560}
deadline=$((start + budget))
out=${OUT:-.study/out}
py=${PYTHON:-python3}
study=${STUDY_DIR:-.study}
overrides=(${STUDY_OVERRIDES:-})
if [ "$study" != .study ]; then # another home for corpus, caches and runs (tests)
  overrides=("data.paths=[$study/corpus/study]" "data.cache_dir=$study/cache" "hydra.sweep.dir=$study/runs" "${overrides[@]}")
fi
kept=docs/results/gpu
collect=$study/collect
tokenizer=$kept/corpus/tokenizer.json
mkdir -p "$out" "$collect" "$study/logs"
export PYTHONPATH=/opt/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 # never NVLink multicast on shared hosts
log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$out/run_study.log"; }
left() { echo $((deadline - $(date +%s))); }

pack() {
  tar -czf "$out/study_results.tar.gz" -C "$collect" . 2>/dev/null && log "packed $out/study_results.tar.gz"
}
trap pack EXIT

build_corpus() {
  if [ -f $study/corpus/study.idx ] && [ -f $study/corpus/summary.json ]; then
    log "corpus: $study/corpus/study up to date"
  else
    log "corpus: building (budget $(($(left) - 30)) s)"
    # shellcheck disable=SC2086
    timeout $(($(left) - 30)) $py scripts/build_study_corpus.py --out $study/corpus --tokenizer "$tokenizer" \
      ${STUDY_CORPUS_ARGS:-} >>"$study/logs/corpus.log" 2>&1
    local rc=$?
    tail -3 "$study/logs/corpus.log" | tee -a "$out/run_study.log"
    [ $rc -eq 0 ] || { log "corpus: failed (rc=$rc), see $study/logs/corpus.log"; return 1; }
  fi
  mkdir -p "$collect/corpus"
  cp $study/corpus/summary.json $study/corpus/sources.jsonl.gz $study/corpus/study.manifest.json "$collect/corpus/"
  # The same tokens for every point, whichever host built them: compare with the corpus kept in the repo.
  if [ -f $kept/corpus/summary.json ] && [ -z "${STUDY_NEW_CORPUS:-}" ]; then
    $py - $kept/corpus/summary.json $study/corpus/summary.json <<'EOF' || return 1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
if a.get("corpus_sha256") != b.get("corpus_sha256") or a.get("tokens") != b.get("tokens"):
    sys.exit(f"corpus: this host built a different corpus ({b.get('tokens')} tokens, sha256 "
             f"{b.get('corpus_sha256', '?')[:12]}) than the one in the repo ({a.get('tokens')} tokens, "
             f"{a.get('corpus_sha256', '?')[:12]}): other packages installed? Runs on it are not comparable; "
             "set STUDY_NEW_CORPUS=1 to run anyway")
EOF
  fi
}

# Prints done | partial | missing for a run dir (llmtrain/analysis/runs.py: run_status).
status() { $py -c "import sys; from llmtrain.analysis.runs import run_status; print(run_status(sys.argv[1]))" "$1"; }

run_point() {
  local p=$1 dir
  dir=$($py -c "import sys; from llmtrain.analysis.runs import study_run_dir; print(study_run_dir(sys.argv[1], sys.argv[2:]))" \
    "$p" "${overrides[@]}")
  if [ "$(status "$kept/$p")" = done ] && [ ${#overrides[@]} -eq 0 ]; then
    log "$p: finished (in $kept/$p), skipped"
    return 0
  fi
  if [ "$(status "$dir")" = done ]; then
    log "$p: finished (in $dir), skipped"
  else
    local t=$(($(left) - 75)) # room for the checkpoint on SIGTERM, the kill grace and packing
    if [ $t -lt 60 ]; then
      log "$p: not started, $(left) s left"
      return 1
    fi
    log "$p: training for at most $t s"
    timeout --signal=TERM --kill-after=30 $t $py -m llmtrain -m recipe=gpu_study point="$p" "${overrides[@]}" \
      >>"$study/logs/$p.log" 2>&1
    local rc=$?
    log "$p: rc=$rc ($(status "$dir"))"
    [ $rc -eq 0 ] || [ $rc -eq 124 ] || tail -3 "$study/logs/$p.log" | tee -a "$out/run_study.log"
  fi
  mkdir -p "$collect/$p"
  cp "$dir/metrics.jsonl" "$dir/config.yaml" "$collect/$p/" 2>/dev/null
  mkdir -p "$collect/$p/.hydra" && cp "$dir/.hydra/overrides.yaml" "$collect/$p/.hydra/" 2>/dev/null
  tail -c 200000 "$study/logs/$p.log" >"$collect/$p/train.log" 2>/dev/null
}

measure() {
  # Throughput of the two model candidates, BF16 and emulated NVFP4, on mock tokens (no corpus needed).
  local steps=${MEASURE_STEPS:-30}
  for m in ${MEASURE_MODELS:-study_125m study_85m}; do
    for p in bf16_s1 nvfp4_s1; do
      local t=$(($(left) - 20))
      [ $t -ge 60 ] || { log "measure $m $p: not started, $(left) s left"; continue; }
      rm -rf "$study/measure/$m-$p" # a fresh run each time, never a resume of the last measurement
      timeout --kill-after=10 $((t < 150 ? t : 150)) $py -m llmtrain recipe=gpu_study point=$p model=$m \
        "${overrides[@]}" data.mock=true 'data.paths=[]' train.steps="$steps" train.eval_interval=1000 \
        train.checkpoint_interval=0 train.resume=never hydra.run.dir=$study/measure/$m-$p \
        >>"$study/logs/measure.log" 2>&1
      local rc=$?
      log "measure $m $p: rc=$rc"
      [ $rc -eq 0 ] || tail -2 "$study/logs/measure.log" | tee -a "$out/run_study.log"
      mkdir -p "$collect/measure"
      cp $study/measure/$m-$p/metrics.jsonl "$collect/measure/$m-$p.jsonl" 2>/dev/null
      rm -rf "$study/measure/$m-$p/checkpoints" # the final save (~1.8 GB) is of no use
    done
  done
  $py - "$collect/measure" <<'EOF' | tee "$out/measure.md" | tee -a "$out/run_study.log"
import json, pathlib, statistics, sys
print("| run | steps | tokens/s (median, after step 10) | MFU | min for 100M tokens | peak GiB |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    steady = [r for r in recs if r["step"] > 10] or recs
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = statistics.median(r.get("mfu", 0) for r in steady)
    mem = max((r.get("mem_gib", 0) for r in recs), default=0)
    print(f"| {f.stem} | {recs[-1]['step']} | {tps:,.0f} | {100 * mfu:.1f}% | {100e6 / tps / 60:.1f} | {mem:.1f} |")
EOF
}

cmd=${1:-run}
shift || true
case $cmd in
  measure) measure ;;
  corpus) build_corpus ;;
  run)
    build_corpus || exit 1
    points=("$@")
    if [ ${#points[@]} -eq 0 ]; then
      mapfile -t points < <($py -c "from llmtrain.analysis.runs import study_points; print(*study_points(), sep='\n')")
    fi
    log "points: ${points[*]}"
    for p in "${points[@]}"; do
      run_point "$p" || break
    done
    ;;
  *)
    echo "usage: $0 [measure | corpus | run [POINT ...]]" >&2
    exit 2
    ;;
esac

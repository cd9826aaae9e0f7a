# ---- llmtrain job body: slurm/*.sbatch source this file; `cluster=slurm` copies it into each job.sbatch ----
# The one copy of the shell code every llmtrain batch job runs after its #SBATCH header. Arguments (the
# script's "$@") are Hydra overrides; LLMTRAIN_* variables set before it (docs/slurm.md) adjust it.
# shellcheck shell=bash
set -uo pipefail
say() { echo "llmtrain: $*"; }
job=$SLURM_JOB_ID
restarts=${SLURM_RESTART_COUNT:-0}
# An SBATCH_EXPORT=NONE site starts this script without an exported PATH, and srun would inherit
# SLURM_EXPORT_ENV=NONE: its ranks would start with no environment (`execve(): bash: No such file`).
export PATH
unset SLURM_EXPORT_ENV

# B:USR1 (the time-limit warning) and TERM reach only this shell: pass them on to srun, which forwards
# them to every rank; the ranks checkpoint at the end of the step and exit. A warning is re-sent every
# second until the step ends, so one that arrives while srun or the ranks are still starting (and ignore
# it, see below) is not lost.
step_pid="" warned="" requeueing=""
forward() {
  echo "llmtrain: $(date -u +%FT%TZ) got SIG$1, forwarding to the ranks"
  [[ $1 == USR1 ]] && warned=1
  [[ -n $step_pid ]] && kill -s "$1" "$step_pid" 2>/dev/null
  # SLURM requeued or is ending the job (scontrol requeue, node failure, preemption, scancel, time limit):
  # say so now, as SLURM kills this shell KillWait seconds later, maybe before the ranks are done.
  [[ $1 == TERM && -z $requeueing ]] || return 0
  if requeued_by_slurm; then
    say "job $job was requeued by SLURM; the ranks checkpoint, and it resumes from checkpoints/latest"
    event "end step=$(last_step) requeued"
  elif [[ $(job_state) != RUNNING ]]; then
    say "job $job is $(job_state) (cancelled or at its time limit): the ranks checkpoint the step they are" \
        "at; resume with the same command and hydra.run.dir=${run_dir:-?} (exit 75)"
    event "end rc=75 stopped"
  fi
}
job_state() { scontrol show job -o "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
# SLURM counts a requeue (its own or ours) at once, while the job may still show COMPLETING.
requeued_by_slurm() {
  local n
  n=$(scontrol show job -o "$job" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
  ((${n:-0} > restarts))
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

python=${LLMTRAIN_PYTHON:-python}
ntasks=${SLURM_NTASKS:-1}
job_tag=${SLURM_JOB_NAME}-$job
rank_logs=${LLMTRAIN_LOG_DIR:-logs}/$job_tag
mkdir -p "$rank_logs"
# One line per start and end of this job: `python -m llmtrain.launch status` reads it (no accounting needed).
event() { echo "$(date +%s) $*" >>"$rank_logs/events" 2>/dev/null; }
last_step() { tail -n 1 "$run_dir/metrics.jsonl" 2>/dev/null | grep -o '"step": *[0-9]*' | grep -o '[0-9]*$'; }

args=("$@") run_dir=""
for a in "$@"; do [[ $a == hydra.run.dir=* ]] && run_dir=${a#hydra.run.dir=}; done
[[ -n $run_dir ]] || { run_dir=runs/slurm/$job_tag; args+=("hydra.run.dir=$run_dir"); }
mkdir -p "$run_dir"
event "start restart=$restarts"

# One job per run dir: this shell holds an flock on <run dir>/.llmtrain.lock while the job runs (released
# by the kernel however the job ends), and <run dir>/.llmtrain.job names the job that owns the run dir.
if command -v flock >/dev/null; then
  exec {lock_fd}>>"$run_dir/.llmtrain.lock"
  flock -n -E 200 "$lock_fd"
  lock_rc=$?
  ((lock_rc != 0 && lock_rc != 200)) && say "warning: cannot lock $run_dir/.llmtrain.lock (flock status" \
    "$lock_rc: no locks on this file system?); nothing stops a second job from training in $run_dir"
  if ((lock_rc == 200)); then
    say "error: run dir $run_dir is in use by job $(cat "$run_dir/.llmtrain.job" 2>/dev/null || echo '?')" \
        "(it holds $run_dir/.llmtrain.lock); job $job did not train (exit 16)"
    event "end rc=16 error=run dir in use by another job"
    exit 16
  fi
else
  say "warning: no flock on this node; nothing stops a second job from training in $run_dir"
fi
echo "$job" >"$run_dir/.llmtrain.job"

# Rendezvous for torch.distributed (env://): the first node of the allocation; the port derives from the
# job id so that jobs sharing a node do not collide, and stays the same when the job is requeued.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + job % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # ranks come from srun (SLURM_PROCID, ...), not the caller
# Rank 0 writes this file when a signal stopped training before train.steps (step, checkpoint, limit).
stop_file=$run_dir/.llmtrain.stop.$job
rm -f "$stop_file"
export LLMTRAIN_STOP_FILE=$stop_file

# --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others blocked in a collective.
# srun does not inherit --cpus-per-task from sbatch since 22.05, hence the explicit flag.
srun_args=(--export=ALL --kill-on-bad-exit=1 --output="$rank_logs/rank%t.log" --open-mode=append
           ${LLMTRAIN_SRUN_ARGS:-})
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [[ -n ${LLMTRAIN_CONTAINER_IMAGE:-} ]]; then
  mounts=$PWD:$PWD
  run_abs=$(cd "$run_dir" && pwd)
  [[ $run_abs == "$PWD"/* ]] || mounts+=,$run_abs:$run_abs
  srun_args+=(--container-image="$LLMTRAIN_CONTAINER_IMAGE" --container-workdir="$PWD"
              --container-mounts="$mounts${LLMTRAIN_CONTAINER_MOUNTS:+,$LLMTRAIN_CONTAINER_MOUNTS}"
              ${LLMTRAIN_CONTAINER_ENV:+--container-env="$LLMTRAIN_CONTAINER_ENV"})
fi

# Where each rank log ends now: the logs are appended across requeues, errors are read from this run on.
offsets=()
for ((i = 0; i < ntasks; i++)); do offsets[i]=$(stat -c %s "$rank_logs/rank$i.log" 2>/dev/null || echo 0); done
this_run() { tail -c +$((offsets[$1] + 1)) "$rank_logs/rank$1.log" 2>/dev/null; }

say "job $job restart $restarts on $SLURM_JOB_NODELIST, $ntasks ranks, master $MASTER_ADDR:$MASTER_PORT;" \
    "rank logs $rank_logs/rank*.log"
say "$python -m llmtrain ${args[*]}"
# srun and the ranks start with USR1 ignored (both die of it before their handlers are installed); srun's
# own handler, installed early in its startup, then forwards it; `bash -c` sets the ranks' disposition and
# logs the rank's own exit status: when one rank fails, srun TERMs the others, and srun's status is then
# often 143 rather than the error's.
rank_cmd=(bash -c 'trap "" USR1; trap : TERM; "$@"; rc=$?
echo "llmtrain: rank ${SLURM_PROCID:-0} exited with status $rc"; exit $rc' llmtrain "$python" -m llmtrain "${args[@]}")
(trap '' USR1; exec srun "${srun_args[@]}" "${rank_cmd[@]}") &
step_pid=$!
while kill -0 "$step_pid" 2>/dev/null; do
  sleep 1 &
  wait $!  # returns early when a trapped signal arrives
  [[ -n $warned ]] && kill -s USR1 "$step_pid" 2>/dev/null
done
wait "$step_pid"  # srun's exit status (bash keeps it after the child is reaped)
rc=$?

rank_status() { this_run "$1" | sed -n 's/^llmtrain: rank [0-9]* exited with status \([0-9]*\)$/\1/p' | tail -n1; }
if ((rc != 0)); then
  # srun itself can end with a signal's status after a cancel (it is signalled along with the ranks) while
  # every rank finished cleanly: the ranks' own statuses decide, srun's only where a rank did not report.
  clean=1
  for ((i = 0; i < ntasks; i++)); do [[ $(rank_status "$i") == 0 ]] || clean=""; done
  [[ -n $clean ]] && { say "srun exited with status $rc, but every rank exited with status 0"; rc=0; }
fi
if ((rc != 0)); then
  # The real error: the first rank that exited on its own with a non-zero status (not of a signal).
  bad="" first=""
  for ((i = 0; i < ntasks; i++)); do
    s=$(rank_status "$i")
    [[ -n $s && $s != 0 && -z $first ]] && first=$i
    [[ -n $s && $s != 0 ]] && ((s < 128)) && { bad=$i; rc=$s; break; }
  done
  bad=${bad:-${first:-0}}
  err=$(this_run "$bad" | grep -m1 -E '^(error: |[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt)(:|$))')
  say "error: job $job failed with exit status $rc; rank $bad: ${err:-no error line, see the log}" \
      "(rank log $rank_logs/rank$bad.log)"
  event "end rc=$rc step=$(last_step) rank=$bad error=${err:-}"
  exit "$rc"
fi

if [[ ! -f $stop_file ]]; then
  say "training step exited with status 0"
  event "end rc=0 step=$(last_step)"
  rm -f "$run_dir/.llmtrain.job"
  exit 0
fi

# Stopped by a signal before train.steps, with a checkpoint: requeue, or say why not. Decided here, outside
# any container, so the ranks need no SLURM tools.
read -r step steps limit ckpt <"$stop_file"  # kept for `launch status` (removed when the job restarts)
state=$(job_state)
requeued_by_slurm && state=REQUEUED
resume="resume with the same command and hydra.run.dir=$run_dir"
case ${state:-UNKNOWN} in
  RUNNING)
    if ((restarts < limit)); then
      say "requeueing job $job (restart $((restarts + 1)) of at most $limit) at step $step of $steps;" \
          "it resumes from $ckpt"
      event "end rc=0 step=$step requeue"
      requeueing=1
      if out=$(scontrol requeue "$job" 2>&1); then exit 0; fi
      say "error: scontrol requeue $job failed: $out; $resume"
    else
      say "not requeueing job $job: it already restarted $restarts times (cluster.requeue_limit=$limit);" \
          "stopped at step $step of $steps, checkpoint $ckpt; $resume (exit 75)"
    fi ;;
  PENDING | REQUEUE*)
    say "job $job was requeued by SLURM at step $step of $steps; it resumes from $ckpt"
    event "end rc=0 step=$step requeued"
    exit 0 ;;
  *)
    say "job $job is $state (cancelled or at its time limit): stopped at step $step of $steps," \
        "checkpoint $ckpt; $resume (exit 75)" ;;
esac
event "end rc=75 step=$step stopped"
rm -f "$run_dir/.llmtrain.job"
exit 75  # stopped before train.steps: not COMPLETED, so `afterok` dependencies do not start

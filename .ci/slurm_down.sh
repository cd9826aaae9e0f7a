#!/usr/bin/env bash
# Stop the cluster started by .ci/slurm_up.sh: cancel its jobs, then stop slurmd and slurmctld by pid.
set -uo pipefail

home=${LLMTRAIN_SLURM_HOME:-/tmp/llmtrain-slurm}
[[ -f $home/slurm.conf ]] || exit 0
export SLURM_CONF=$home/slurm.conf

# Jobs first, while slurmd is alive to kill their steps (otherwise slurmstepd processes would linger).
if squeue -h -o %i >/dev/null 2>&1; then
  mapfile -t jobs < <(squeue -h -o %i)
  if ((${#jobs[@]})); then
    scancel "${jobs[@]}" 2>/dev/null || true
    for _ in $(seq 1 40); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.25
    done
  fi
fi

stop() {  # stop one daemon by the pid slurm_up.sh recorded
  local pidfile=$home/$1.pid.own pid
  [[ -f $pidfile ]] || return 0
  pid=$(<"$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
}
stop slurmd
stop slurmctld
echo "slurm down (state and logs kept in $home)"

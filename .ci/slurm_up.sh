#!/usr/bin/env bash
# Start a private one-node SLURM cluster (slurmctld + slurmd as root) for the `slurm` tests.
#
# Everything lives under $LLMTRAIN_SLURM_HOME (default /tmp/llmtrain-slurm): slurm.conf, state and spool
# dirs, daemon logs and pid files. Clients find the cluster through SLURM_CONF=$LLMTRAIN_SLURM_HOME/slurm.conf
# (tests/integration/conftest.py sets it; for a shell: `source $LLMTRAIN_SLURM_HOME/env`).
# Auth is auth/none + cred/none: no munged to run, nothing to do with this machine's users. Fine for a
# throwaway cluster bound to 127.0.0.1; never use that on a real one. Stop it with .ci/slurm_down.sh.
set -euo pipefail

home=${LLMTRAIN_SLURM_HOME:-/tmp/llmtrain-slurm}
pkgs=(slurmctld slurmd slurm-client munge)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi

# A previous cluster under the same dir: stop it first (its saved state would bring old jobs back).
if [[ -d $home ]]; then
  bash "$(dirname "$0")/slurm_down.sh" >/dev/null 2>&1 || true
  rm -rf "$home"
fi
mkdir -p "$home"/{ctld,spool,log}

# The node line is what slurmd detects here (CPUs, sockets, memory). The node is called localhost, so the
# MASTER_ADDR the job scripts take from the node list resolves even where this host's name does not.
node=localhost
node_line=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$node/")
ctld_host=$(hostname -s)
ctld_port=${LLMTRAIN_SLURMCTLD_PORT:-6817}
slurmd_port=${LLMTRAIN_SLURMD_PORT:-6818}

cat >"$home/slurm.conf" <<CONF
ClusterName=llmtrain-ci
SlurmctldHost=$ctld_host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$home/ctld
SlurmdSpoolDir=$home/spool
SlurmctldPidFile=$home/slurmctld.pid
SlurmdPidFile=$home/slurmd.pid
SlurmctldLogFile=$home/log/slurmctld.log
SlurmdLogFile=$home/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
# Cores only: memory is not a consumable, so jobs never wait on a DefMemPerNode of "all of it".
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Short kill grace and a long memory of finished jobs: tests read final states with scontrol.
KillWait=5
MinJobAge=900
InactiveLimit=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

cat >"$home/env" <<ENV
export SLURM_CONF=$home/slurm.conf
ENV
export SLURM_CONF=$home/slurm.conf

# -D keeps them in the foreground of their own session, so $! is the daemon's pid (used by slurm_down.sh).
setsid slurmctld -D -i -f "$SLURM_CONF" >"$home/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$home/slurmctld.pid.own"
setsid slurmd -D -N "$node" -f "$SLURM_CONF" >"$home/log/slurmd.out" 2>&1 </dev/null &
echo $! >"$home/slurmd.pid.own"

for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
  if [[ $state == idle ]]; then
    echo "slurm up: node $node idle; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm_up: node did not become idle (state '${state:-none}'); logs:" >&2
tail -n 20 "$home/log/"*.log "$home/log/"*.out >&2 || true
exit 1

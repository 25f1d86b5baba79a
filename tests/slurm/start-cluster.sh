#!/usr/bin/env bash
# Start a throw-away one-node Slurm cluster from Debian's packages, for the test suite.
#
# One node ("localhost") in two partitions: "cpu" (the default) and "gpu". The node declares
# two fake GPUs (char devices that behave like /dev/null), so `--gpus=1` and `--gres=gpu:1`
# requests are scheduled on a machine without a GPU. Everything lives under $SLURM_ROOT and
# runs as root, without systemd: munged, slurmctld and slurmd daemonise themselves and are
# stopped by tests/slurm/stop-cluster.sh through their PID files.
#
# Usage (as root):  SLURM_ROOT=/tmp/scaling-lab-slurm tests/slurm/start-cluster.sh
#   NODE_CPUS, NODE_MEM_MB  advertise a bigger node than the machine (nothing is enforced).
# Idempotent: a cluster that is already up is left alone; the packages are only installed
# when missing. The recipe and its gotchas: ../shared/notes/slurm-single-node/README.md.
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/scaling-lab-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES=(slurmctld slurmd slurm-client munge)
MUNGE_SOCKET=$SLURM_ROOT/munge/munge.socket.2
say() { echo "[start-cluster] $(date +%T) $*"; }
die() { echo "[start-cluster] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$SLURM_ROOT/run/slurmctld.pid" && alive "$SLURM_ROOT/run/slurmd.pid" \
    && timeout 10 sinfo -h -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated|completing'; then
    say "already running (SLURM_ROOT=$SLURM_ROOT)"
    exit 0
fi

# ---- packages: only when missing ----------------------------------------------------------
installed() {
    dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null | grep -c '^install ok installed$' || true
}
if [ "$(installed "${PACKAGES[@]}")" != "${#PACKAGES[@]}" ]; then
    say "installing ${PACKAGES[*]}"
    # The packages' init scripts must not start daemons with Debian's default paths; a
    # policy-rc.d that denies every start does that (Docker images ship one already).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

# ---- a clean start: stop leftovers of an earlier, partial start ---------------------------
SLURM_ROOT=$SLURM_ROOT bash "$HERE/stop-cluster.sh" >/dev/null
for link in slurm.conf gres.conf; do
    target=/etc/slurm/$link
    if [ -e "$target" ] && [ "$(readlink "$target")" != "$SLURM_ROOT/etc/$link" ]; then
        die "$target exists and is not this test cluster's; refusing to replace it"
    fi
done
rm -rf "$SLURM_ROOT/state" "$SLURM_ROOT/log" "$SLURM_ROOT/run"
mkdir -p "$SLURM_ROOT"/{etc,state/ctld,state/d,log,run,munge,dev}
chmod 755 "$SLURM_ROOT/munge"  # munged refuses a socket directory others cannot traverse

# ---- slurm.conf and gres.conf --------------------------------------------------------------
cpus=${NODE_CPUS:-$(nproc)}
real_mb=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
memory_mb=${NODE_MEM_MB:-$((real_mb * 8 / 10))}  # above the real value the node is drained
overrides=""
[ -n "${NODE_CPUS:-}${NODE_MEM_MB:-}" ] && overrides="SlurmdParameters=config_overrides"

# gres/gpu needs a File= that is a character device; a file-less GPU drains the node.
for index in 0 1; do
    [ -c "$SLURM_ROOT/dev/gpu$index" ] || mknod -m 666 "$SLURM_ROOT/dev/gpu$index" c 1 3
done

# MinJobAge: finished jobs stay visible to squeue (the status command without accounting, and
# the tests' evidence) for an hour. KillWait: scancel escalates to SIGKILL after 5 s.
cat > "$SLURM_ROOT/etc/slurm.conf" <<CONF
ClusterName=scaling-lab-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_ROOT/state/ctld
SlurmdSpoolDir=$SLURM_ROOT/state/d
SlurmctldPidFile=$SLURM_ROOT/run/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/run/slurmd.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=3600
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$overrides
GresTypes=gpu
NodeName=localhost CPUs=$cpus RealMemory=$memory_mb Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
CONF

cat > "$SLURM_ROOT/etc/gres.conf" <<CONF
AutoDetect=off
NodeName=localhost Name=gpu File=$SLURM_ROOT/dev/gpu[0-1]
CONF

# Inside a job, the jobstep executor drops SLURM_CONF before its srun, so the config must be
# found at the compiled-in default path.
mkdir -p /etc/slurm
ln -sfn "$SLURM_ROOT/etc/slurm.conf" /etc/slurm/slurm.conf
ln -sfn "$SLURM_ROOT/etc/gres.conf" /etc/slurm/gres.conf

# ---- daemons --------------------------------------------------------------------------------
say "starting munged"
[ -s "$SLURM_ROOT/munge/munge.key" ] || mungekey --create --keyfile="$SLURM_ROOT/munge/munge.key"
chmod 600 "$SLURM_ROOT/munge/munge.key"
munged --key-file="$SLURM_ROOT/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$SLURM_ROOT/munge/munged.pid" --log-file="$SLURM_ROOT/munge/munged.log" \
    --seed-file="$SLURM_ROOT/munge/munged.seed"
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null

say "starting slurmctld and slurmd"
slurmctld
slurmd -N localhost  # the node's name, whatever the machine's hostname is
for _ in $(seq 1 150); do
    sinfo -h -o %T 2>/dev/null | grep -qx idle && break
    sleep 0.2
done
if ! sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    sinfo >&2 || true
    tail -n 20 "$SLURM_ROOT"/log/*.log >&2 || true
    die "the node did not become idle; logs above"
fi
say "up: $(sinfo -h -o '%P %D %c %m %G %T' | tr '\n' ';')"

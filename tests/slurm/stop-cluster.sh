#!/usr/bin/env bash
# Stop the test cluster that start-cluster.sh started: cancel its jobs, then stop slurmd,
# slurmctld and munged through their PID files (never by process name) and remove the links
# in /etc/slurm. $SLURM_ROOT (logs, state) is kept for inspection. Safe to run twice.
set -uo pipefail

SLURM_ROOT=${SLURM_ROOT:-/tmp/scaling-lab-slurm}

# SIGTERM the process in PID file $1 and wait until it is gone; a zombie counts as gone,
# since an init that reaps late may keep it in the process table for a while.
stop() {
    local pid_file=$1 pid state
    [ -s "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 0
        case $state in Z*) return 0 ;; esac
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
}

if [ -s "$SLURM_ROOT/run/slurmctld.pid" ] && command -v squeue >/dev/null; then
    mapfile -t jobs < <(timeout 10 squeue -h -o %i 2>/dev/null)
    [ "${#jobs[@]}" = 0 ] || timeout 10 scancel "${jobs[@]}" 2>/dev/null
fi
stop "$SLURM_ROOT/run/slurmd.pid"
stop "$SLURM_ROOT/run/slurmctld.pid"
stop "$SLURM_ROOT/munge/munged.pid"
for link in slurm.conf gres.conf; do
    if [ "$(readlink "/etc/slurm/$link")" = "$SLURM_ROOT/etc/$link" ]; then
        rm -f "/etc/slurm/$link"
    fi
done
echo "[stop-cluster] stopped (logs in $SLURM_ROOT/log)"

#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by slurm-up.sh, by pid, in dependency order: slurmd and slurmctld
# first (they talk to slurmdbd while shutting down), then slurmdbd, then MariaDB, munged last (everything above
# authenticates through it). Safe to run twice or when nothing runs. `--purge` also deletes the state folder
# (job ids then restart at 1: use a fresh submitit folder per run); `--slurm-only` stops just the Slurm
# daemons (slurm-up.sh does that when their configuration changed).
#
# Environment: MMTRACE_SLURM_DIR (default /tmp/mmtrace-slurm), as for slurm-up.sh.
set -euo pipefail

STATE=${MMTRACE_SLURM_DIR:-/tmp/mmtrace-slurm}
log() { echo "slurm-down: $*" >&2; }

# SIGTERM every pid named by the given pid files, wait up to 15 s for them to exit, then SIGKILL the rest.
stop_phase() {
  local pids=() f pid
  for f in "$@"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" && pids+=("$pid") && log "stopping $(basename "$f" .pid) ($pid)"
    fi
  done
  local t0=$SECONDS
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < 15 )); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "killing $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  for f in "$@"; do rm -f "$f"; done
}

stop_phase "$STATE/slurmd.pid" "$STATE/slurmctld.pid"
stop_phase "$STATE/slurmdbd.pid"
if [ "${1:-}" = "--slurm-only" ]; then exit 0; fi  # slurm-up.sh after a configuration change
stop_phase "$STATE/db/mariadbd.pid"
stop_phase "$STATE/munge/munged.pid"
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE"
  log "removed $STATE"
fi
log "down"

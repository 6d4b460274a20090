#!/usr/bin/env bash
# Stop the Ray head started by ray-up.sh, and only it: SIGTERM to its `ray start --block` (which stops the
# processes it started), then any process still naming this head's temp dir on its command line (workers
# and job drivers run in sessions of their own, so they can outlive their parent). `ray stop` is not used: it
# stops every Ray on the machine. Safe to run twice or when nothing runs. `--purge` also deletes the state
# folder (logs included).
#
# Environment: MMTRACE_RAY_DIR (default /tmp/mmtrace-ray), as for ray-up.sh.
set -euo pipefail

STATE=${MMTRACE_RAY_DIR:-/tmp/mmtrace-ray}
log() { echo "ray-down: $*" >&2; }

# Pids of live processes whose command line holds this head's temp dir.
session_pids() {
  local dir=$STATE/ray cmd pid
  for cmd in /proc/[0-9]*/cmdline; do
    pid=${cmd#/proc/}; pid=${pid%/cmdline}
    [ "$pid" = "$$" ] && continue
    { tr '\0' ' ' < "$cmd"; } 2>/dev/null | grep -qF -- "$dir/" && echo "$pid"
  done
  return 0
}

# SIGTERM the given pids, wait up to $1 seconds for them to exit, then SIGKILL the rest.
stop_pids() {
  local grace=$1; shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  local t0=$SECONDS pid
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < grace )); do sleep 0.2; done
  done
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null; then log "killing $pid"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

if [ -f "$STATE/ray.pid" ] && kill -0 "$(cat "$STATE/ray.pid")" 2>/dev/null; then
  log "stopping the head (pid $(cat "$STATE/ray.pid"))"
  stop_pids 20 "$(cat "$STATE/ray.pid")"
fi
mapfile -t left < <(session_pids)
if [ ${#left[@]} -gt 0 ]; then
  log "stopping ${#left[@]} process(es) left from $STATE/ray"
  stop_pids 10 "${left[@]}"
fi
rm -f "$STATE/ray.pid" "$STATE/address" "$STATE/gcs"
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE"
  log "removed $STATE"
fi
log "down"

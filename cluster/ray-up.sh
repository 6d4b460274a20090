#!/usr/bin/env bash
# Start a single-node Ray head on 127.0.0.1 with the dashboard's job server, for `ray job submit` and mmtrace's
# Ray backend. Prints the job server's address (http://127.0.0.1:PORT) on stdout, the only thing it prints
# there, so `addr=$(bash cluster/ray-up.sh)` works. Idempotent: a second call finds the head alive and prints
# its address again. `cluster/ray-down.sh` stops it.
#
# Why `ray start --block` in the background: the head then has one parent process whose pid is recorded, and
# ray-down.sh stops exactly this cluster (`ray stop` would stop every Ray on the machine).
# Why RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray advertises the machine's network address even with
# --node-ip-address=127.0.0.1; with it every listener binds 127.0.0.1 (check with `ss -ltnp`).
# Why RAY_AUTH_MODE=disabled: Ray 2.60 turns on token auth for `ray start`; clients on this machine then need
# the token. mmtrace's Ray backend and `ray job submit` both run with auth disabled against this head.
# Every port is fixed up front (given, or a free one on 127.0.0.1), so none is left to Ray's defaults.
#
# Environment:
#   MMTRACE_RAY_DIR             pid, addresses, log and Ray's temp dir (default /tmp/mmtrace-ray; keep it short:
#                               Ray's socket paths under it must fit in 107 characters)
#   MMTRACE_RAY_PORT            GCS port (default: a free port)
#   MMTRACE_RAY_DASHBOARD_PORT  dashboard and job server port (default 8265, or a free port when taken)
#   MMTRACE_RAY_CPUS            CPUs the head offers (default: nproc)
#   RAY                         the ray command (default: `ray` on PATH)
set -euo pipefail

STATE=${MMTRACE_RAY_DIR:-/tmp/mmtrace-ray}
RAY=${RAY:-$(command -v ray || true)}
CPUS=${MMTRACE_RAY_CPUS:-$(nproc)}
HOST=127.0.0.1
START=$SECONDS

log() { echo "ray-up: $*" >&2; }
die() { echo "ray-up: error: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
port_free() { ! (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# $1 distinct ports on 127.0.0.1 that nothing listens on now (all held open at once, so none repeats).
free_ports() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

# The job server answers once the dashboard has started its job module.
jobs_api_up() {
  "$PYTHON" -c "import urllib.request as u; u.urlopen('$1/api/version', timeout=2).read()" >/dev/null 2>&1
}

# Wait up to $2 seconds for the job server at $1; give up at once if `ray start` exited.
wait_for_jobs() {
  local t0=$SECONDS
  until jobs_api_up "$1"; do
    alive "$STATE/ray.pid" || return 1
    (( SECONDS - t0 < $2 )) || return 1
    sleep 0.5
  done
}

already_up() {
  alive "$STATE/ray.pid" && [ -s "$STATE/address" ] || return 1
  log "head already running (pid $(cat "$STATE/ray.pid")), job server $(cat "$STATE/address")"
  cat "$STATE/address"
}

choose_ports() {
  local flags=(node-manager-port object-manager-port dashboard-agent-listen-port dashboard-agent-grpc-port
               runtime-env-agent-port metrics-export-port ray-client-server-port)
  local ports i
  read -r -a ports <<< "$(free_ports $(( ${#flags[@]} + 2 )))"
  GCS_PORT=${MMTRACE_RAY_PORT:-${ports[0]}}
  DASH_PORT=${MMTRACE_RAY_DASHBOARD_PORT:-8265}
  if [ -z "${MMTRACE_RAY_DASHBOARD_PORT:-}" ] && ! port_free "$DASH_PORT"; then DASH_PORT=${ports[1]}; fi
  port_free "$GCS_PORT" || die "port $GCS_PORT (MMTRACE_RAY_PORT) is taken"
  port_free "$DASH_PORT" || die "port $DASH_PORT (MMTRACE_RAY_DASHBOARD_PORT) is taken"
  PORT_ARGS=(--port="$GCS_PORT" --dashboard-port="$DASH_PORT")
  for i in "${!flags[@]}"; do
    PORT_ARGS+=("--${flags[$i]}=${ports[$(( i + 2 ))]}")
  done
}

start_head() {
  mkdir -p "$STATE"
  rm -f "$STATE/address" "$STATE/gcs"
  local args=(start --head --block --node-ip-address="$HOST" --include-dashboard=true --dashboard-host="$HOST"
              "${PORT_ARGS[@]}" --num-cpus="$CPUS" --disable-usage-stats --temp-dir="$STATE/ray")
  log "starting the head: GCS $HOST:$GCS_PORT, job server http://$HOST:$DASH_PORT, $CPUS CPUs, temp $STATE/ray"
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
    setsid "$RAY" "${args[@]}" >"$STATE/ray-start.log" 2>&1 </dev/null &
  echo $! > "$STATE/ray.pid"
}

main() {
  [ -n "$RAY" ] && [ -x "$RAY" ] || die "no ray command; activate the venv or set RAY=/path/to/ray"
  PYTHON=$(dirname "$RAY")/python
  [ -x "$PYTHON" ] || PYTHON=python3
  already_up && return
  choose_ports
  start_head
  local url="http://$HOST:$DASH_PORT"
  wait_for_jobs "$url" 90 || {
    tail -n 30 "$STATE/ray-start.log" >&2
    die "the job server did not answer on $url; see $STATE/ray-start.log and $STATE/ray/session_latest/logs"
  }
  echo "$HOST:$GCS_PORT" > "$STATE/gcs"
  echo "$url" > "$STATE/address"
  log "up in $(( SECONDS - START )) s: GCS $HOST:$GCS_PORT, job server $url (RAY_AUTH_MODE=disabled)"
  echo "$url"
}

main "$@"

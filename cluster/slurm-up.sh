#!/usr/bin/env bash
# Bring up a single-node Slurm cluster with real accounting (munge, MariaDB, slurmdbd, slurmctld, slurmd) on
# Debian, for mmtrace's Slurm backend and its tests. Idempotent: a second call finds the daemons alive and only
# re-checks that a job runs; after slurm-down.sh it restarts warm from the same state folder.
#
# Why accounting: without slurmdbd, `sacct` fails and submitit never sees a killed or cancelled job as finished
# (`job.result()` hangs). Why DefMemPerCPU: otherwise each job takes the whole node's memory and array tasks run
# one at a time. Why batch_sched_delay=0: otherwise batch jobs start up to 3 s late.
#
# Everything listens on 127.0.0.1 except slurmctld and slurmdbd, which always listen on all addresses in Slurm
# 22.05; every client is pointed at 127.0.0.1.
#
# Environment:
#   MMTRACE_SLURM_DIR      state, logs, pid files, database (default /tmp/mmtrace-slurm)
#   MMTRACE_SLURM_DB_PORT  MariaDB port on 127.0.0.1 (default 13306)
#   MMTRACE_SLURM_FORCE=1  overwrite an /etc/slurm/slurm.conf that this script did not write
set -euo pipefail

STATE=${MMTRACE_SLURM_DIR:-/tmp/mmtrace-slurm}
DB_PORT=${MMTRACE_SLURM_DB_PORT:-13306}
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819
MARKER="# managed by mmtrace cluster/slurm-up.sh"
CONF_DIR=/etc/slurm
HOST=$(hostname -s)
SOCK=$STATE/munge/munge.socket.2
START=$SECONDS

log() { echo "slurm-up: $*" >&2; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait up to $1 seconds for command "${@:2}" to succeed.
wait_for() {
  local limit=$1; shift
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 < limit )) || return 1
    sleep 0.5
  done
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them as root (apt-get install -y ${missing[*]})"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${missing[@]}" >/dev/null
  }
}

check_conf_owner() {
  local f=$CONF_DIR/slurm.conf
  if [ -f "$f" ] && ! grep -qF "$MARKER" "$f" && [ "${MMTRACE_SLURM_FORCE:-0}" != 1 ]; then
    die "$f exists and was not written by mmtrace; set MMTRACE_SLURM_FORCE=1 to replace it"
  fi
}

start_munge() {
  mkdir -p "$STATE/munge"
  [ -f "$STATE/munge/munge.key" ] || dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" 2>/dev/null
  chown -R munge:munge "$STATE/munge"
  chmod 755 "$STATE/munge"  # munged wants the socket folder searchable by all
  chmod 400 "$STATE/munge/munge.key"
  alive "$STATE/munge/munged.pid" && return
  log "starting munged on $SOCK"
  local args=(--socket="$SOCK" --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid"
              --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed")
  su -s /bin/sh munge -c "$(printf '%q ' /usr/sbin/munged "${args[@]}")" 2>/dev/null \
    || /usr/sbin/munged --force "${args[@]}"
  wait_for 10 test -S "$SOCK" || die "munged did not create $SOCK; see $STATE/munge/munged.log"
}

db_password() {
  local f=$STATE/db.pass
  [ -s "$f" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$f")
  cat "$f"
}

start_mariadb() {
  local data=$STATE/db/data
  mkdir -p "$STATE/db"
  chown mysql:mysql "$STATE/db"
  if [ ! -d "$data/mysql" ]; then
    log "initialising MariaDB in $data"
    mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/db/install.log" 2>&1 || die "mariadb-install-db failed; see $STATE/db/install.log"
  fi
  if alive "$STATE/db/mariadbd.pid" \
      && ! wait_for 15 mariadb --socket="$STATE/db/mysqld.sock" -u root -e "SELECT 1"; then
    die "MariaDB (pid $(cat "$STATE/db/mariadbd.pid")) runs but does not answer; stop it with slurm-down.sh"
  fi
  if ! alive "$STATE/db/mariadbd.pid"; then
    log "starting MariaDB on 127.0.0.1:$DB_PORT"
    mariadbd --user=mysql --datadir="$data" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --socket="$STATE/db/mysqld.sock" --pid-file="$STATE/db/mariadbd.pid" --log-error="$STATE/db/error.log" \
      --skip-name-resolve --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
    wait_for 30 mariadb --socket="$STATE/db/mysqld.sock" -u root -e "SELECT 1" \
      || die "MariaDB did not start; see $STATE/db/error.log"
  fi
  local pass; pass=$(db_password)
  mariadb --socket="$STATE/db/mysqld.sock" -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 2048 ))
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,spool,log}
  cat > "$CONF_DIR/slurm.conf" <<CONF
$MARKER (state: $STATE)
ClusterName=mmtrace
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
ScronParameters=enable
DefMemPerCPU=$(( mem / cpus ))
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$SOCK
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  (umask 077; cat > "$CONF_DIR/slurmdbd.conf" <<CONF
$MARKER (state: $STATE)
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
CONF
  )
  chown root:root "$CONF_DIR/slurmdbd.conf"
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

start_slurm() {
  if ! alive "$STATE/slurmdbd.pid"; then
    log "starting slurmdbd"
    slurmdbd
    wait_for 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT" \
      || die "slurmdbd is not listening on $DBD_PORT; see $STATE/log/slurmdbd.log"
  fi
  if ! alive "$STATE/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
  fi
  wait_for 30 scontrol ping || die "slurmctld does not answer; see $STATE/log/slurmctld.log"
  if ! alive "$STATE/slurmd.pid"; then
    log "starting slurmd"
    slurmd
  fi
}

node_ready() {
  local st; st=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)
  case $st in
    idle|mix|alloc|comp) return 0 ;;
    down*|drain*|drng*|fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true; return 1 ;;
    *) return 1 ;;
  esac
}

# A trivial batch job must finish and show up as COMPLETED in accounting: the proof that submitit will see
# every job end, killed ones included.
smoke_test() {
  local id
  id=$(sbatch --parsable --wait -o /dev/null -e /dev/null -J mmtrace-smoke -t 1 --wrap true) \
    || die "the smoke-test job failed; see $STATE/log/slurmctld.log and slurmd.log"
  wait_for 30 bash -c "sacct -n -X -P -j $id -o State | grep -q COMPLETED" \
    || die "job $id does not appear in accounting (sacct); see $STATE/log/slurmdbd.log"
}

main() {
  [ "$(id -u)" -eq 0 ] || die "run as root: slurmctld, slurmd and munged are started as root here"
  install_packages
  check_conf_owner
  mkdir -p "$STATE"
  start_munge
  start_mariadb
  local before; before=$({ cat "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf" 2>/dev/null || true; } | md5sum)
  write_configs
  if [ "$before" != "$(cat "$CONF_DIR/slurm.conf" "$CONF_DIR/slurmdbd.conf" | md5sum)" ] \
      && alive "$STATE/slurmctld.pid"; then
    log "configuration changed: restarting the Slurm daemons"
    bash "$(dirname "$0")/slurm-down.sh" --slurm-only
  fi
  start_slurm
  wait_for 60 node_ready || die "node $HOST is not idle: $(sinfo -h -N -o '%N %t %E' 2>&1)"
  smoke_test
  log "up in $(( SECONDS - START )) s: node $HOST $(sinfo -h -n "$HOST" -o '%t, %c CPUs, %m MB'), accounting ok"
}

main "$@"

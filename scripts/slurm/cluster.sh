#!/usr/bin/env bash
# Starts, stops and reports a one-node Slurm cluster on this machine, for testing ctseg under
# Slurm (srun, sbatch, signals, requeue) without a real cluster. Debian 12's packages
# (scripts/slurm/install.sh installs them).
#
#   scripts/slurm/cluster.sh start  STATE_DIR   # idempotent; prints the env, writes STATE_DIR/env.sh
#   scripts/slurm/cluster.sh status STATE_DIR   # exit 0 when munged, slurmctld and slurmd all run
#   scripts/slurm/cluster.sh stop   STATE_DIR   # cancels jobs, ends every daemon and job process
#
# Everything lives under STATE_DIR (nothing in /etc is read or written): slurm.conf and an
# empty plugstack.conf, a munge key and munged's socket (munge/), slurmctld state (ctld/),
# slurmd spool (spool/), pid files (run/), logs (log/). Clients find the cluster through
# SLURM_CONF:  . STATE_DIR/env.sh  (or eval "$(cluster.sh start DIR)").
# Runs as root (SlurmUser=root, SlurmdUser=root); no cgroups (proctrack/linuxproc, task/none),
# no accounting database. The node is `hostname -s` at 127.0.0.1 in partition "debug".
#
# Environment overrides:
#   SLURM_TEST_CPUS          CPUs of the node (default: nproc). May exceed the real count
#                            (SlurmdParameters=config_overrides) to run more ranks than cores.
#   SLURM_TEST_CTLD_PORT     slurmctld port (default 6817); slurmd uses the next one.
#   SLURM_TEST_KILL_WAIT     KillWait: seconds between SIGTERM and SIGKILL at a time limit or
#                            scancel (default 10).
#   SLURM_TEST_START_TIMEOUT seconds to wait for the node to be idle (default 60).
#   SLURM_TEST_CRED_EXPIRE   AuthInfo cred_expire: a requeued job waits this long before it
#                            may start again (default 10; Slurm's default 120, minimum 5).
#
# Processes this script starts carry CTSEG_SLURM_STATE=STATE_DIR in their environment; `stop`
# ends those (and job processes whose SLURM_CONF points here) by pid, never by name.
set -euo pipefail

usage() { sed -n '2,9p' "$0" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
case $cmd in start | stop | status) ;; *) usage ;; esac
state_arg=$2

if [ "$cmd" != start ] && [ ! -d "$state_arg" ]; then
  echo "cluster.sh: $state_arg does not exist: nothing running"
  [ "$cmd" = stop ] && exit 0
  exit 1
fi
mkdir -p "$state_arg"
state=$(cd "$state_arg" && pwd -P)
case $state in *[[:space:]]* | *[,=\(\)]*)
  echo "cluster.sh: STATE_DIR must not contain whitespace or , = ( ): $state" >&2
  exit 2
  ;;
esac

host=$(hostname -s)
cpus=${SLURM_TEST_CPUS:-$(nproc)}
ctld_port=${SLURM_TEST_CTLD_PORT:-6817}
slurmd_port=$((ctld_port + 1))
kill_wait=${SLURM_TEST_KILL_WAIT:-10}
start_timeout=${SLURM_TEST_START_TIMEOUT:-60}
cred_expire=${SLURM_TEST_CRED_EXPIRE:-10}

conf=$state/slurm.conf
sock=$state/munge/munge.socket
marker="CTSEG_SLURM_STATE=$state"
export SLURM_CONF=$conf
export CTSEG_SLURM_STATE=$state

log() { echo "cluster.sh: $*" >&2; }

# pid_of NAME PIDFILE: the pid in PIDFILE if that process is alive, is NAME and was started by
# this script for this STATE_DIR (a stale pid file or a reused pid gives nothing).
pid_of() {
  local name=$1 file=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  [ "$(cat 2>/dev/null "/proc/$pid/comm")" = "$name" ] || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "$marker" || return 1
  echo "$pid"
}
munged_pid() { pid_of munged "$state/munge/munged.pid"; }
ctld_pid() { pid_of slurmctld "$state/run/slurmctld.pid"; }
slurmd_pid() { pid_of slurmd "$state/run/slurmd.pid"; }

node_state() { sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -1; }

# stop_pid PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL.
stop_pid() {
  local pid=$1 wait_s=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < wait_s * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# Pids of leftover processes of this cluster, never this script or its ancestors:
# - daemons started here (environment marker);
# - slurmstepd of this cluster (it overwrites its environment with its process title, so it is
#   recognised by its open SlurmdLogFile under STATE_DIR);
# - job processes (SLURM_CONF here and SLURM_JOB_ID set) and srun/salloc/sbatch clients
#   (SLURM_CONF here), which have nothing left to talk to once the cluster is gone.
leftovers() {
  local ancestors=" " p=$$ e pid comm env_of
  while [ -n "$p" ] && [ "$p" != 0 ]; do
    ancestors+="$p "
    p=$(awk '/^PPid:/{print $2}' "/proc/$p/status" 2>/dev/null || true)
  done
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}
    pid=${pid%/environ}
    case $ancestors in *" $pid "*) continue ;; esac
    comm=$(cat 2>/dev/null "/proc/$pid/comm") || continue
    if [ "$comm" = slurmstepd ]; then
      if find "/proc/$pid/fd" -maxdepth 1 -lname "$state/log/*" 2>/dev/null | grep -q .; then
        echo "$pid"
      fi
      continue
    fi
    env_of=$(tr '\0' '\n' 2>/dev/null <"$e") || continue
    grep -qxF "SLURM_CONF=$conf" <<<"$env_of" || grep -qxF "$marker" <<<"$env_of" || continue
    case $comm in
      srun | salloc | sbatch | munged | slurmctld | slurmd) echo "$pid" ;;
      *) if grep -qxF "$marker" <<<"$env_of" || grep -q '^SLURM_JOB_ID=' <<<"$env_of"; then echo "$pid"; fi ;;
    esac
  done
}

print_logs() {
  local f
  for f in "$state"/log/munged.log "$state"/log/slurmctld.log "$state"/log/slurmd.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 40 lines)" >&2
    tail -40 "$f" >&2
  done
}

print_env() {
  printf 'export SLURM_CONF=%q\n' "$conf" >"$state/env.sh"
  cat "$state/env.sh"
}

do_stop() {
  local pid i left
  if ctld_pid >/dev/null; then
    # Cancel every job so that slurmd/slurmstepd end the job processes themselves.
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --quiet --full "$(squeue -h -o %i | head -1)" 2>/dev/null || true
      squeue -h -o %i 2>/dev/null | xargs -r scancel --quiet 2>/dev/null || true
      for ((i = 0; i < (kill_wait + 10) * 2; i++)); do
        [ -z "$(squeue -h -t running,completing,configuring -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  if pid=$(slurmd_pid); then stop_pid "$pid" 10; fi
  if pid=$(ctld_pid); then stop_pid "$pid" 10; fi
  # slurmstepd and job processes left behind (e.g. slurmctld was already dead).
  for ((i = 0; i < 2; i++)); do
    left=$(leftovers)
    [ -z "$left" ] && break
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $left 2>/dev/null || true
    sleep 1
    left=$(leftovers)
    # shellcheck disable=SC2086
    if [ -n "$left" ]; then kill -KILL $left 2>/dev/null || true; fi
    sleep 0.5
  done
  if pid=$(munged_pid); then stop_pid "$pid" 10; fi
  rm -f "$state"/run/*.pid "$state/munge/munged.pid"
  left=$(leftovers)
  if [ -n "$left" ]; then
    log "processes still running: $left"
    return 1
  fi
  log "stopped ($state)"
}

write_config() {
  mkdir -p "$state"/{munge,ctld,spool,run,log,tmp}
  # munged insists that every directory above its socket be traversable by all ("Socket is
  # inaccessible: execute permissions for all required"); mktemp -d makes 0700 directories.
  chmod a+x "$state"
  chmod 755 "$state/munge"
  local d=$state
  while [ "$d" != / ]; do
    d=$(dirname "$d")
    if [ "$(($(stat -c '%#a' "$d") & 1))" = 0 ]; then
      log "munged needs $d to be traversable by all (chmod o+x), or choose another STATE_DIR"
      return 1
    fi
  done
  if [ ! -s "$state/munge/munge.key" ]; then
    dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$state/munge/munge.key"
  : >"$state/plugstack.conf"
  cat >"$conf" <<EOF
# Written by ctseg scripts/slurm/cluster.sh: a one-node test cluster, everything under
# $state
ClusterName=ctsegtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s; minimum 5).
AuthInfo=socket=$sock,cred_expire=$cred_expire
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$state/plugstack.conf
TmpFS=$state/tmp
MailProg=/bin/true
# No cgroups: processes are tracked through /proc parentage, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
# No accounting database (sacct does not work; use scontrol show job while MinJobAge lasts).
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Main scheduler every 2 s (default 60: a requeued job whose BeginTime passed waits for it).
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=$kill_wait
MinJobAge=300
InactiveLimit=0
OverTimeLimit=0
MessageTimeout=10
SlurmdTimeout=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

do_start() {
  local t0 i st pid
  t0=$(date +%s.%N)
  if munged_pid >/dev/null && ctld_pid >/dev/null && slurmd_pid >/dev/null; then
    case $(node_state) in
      idle | mix | alloc | comp)
        log "already running ($state)"
        print_env
        return 0
        ;;
    esac
  fi
  # Anything half-running from an earlier start of this STATE_DIR goes first.
  if munged_pid >/dev/null || ctld_pid >/dev/null || slurmd_pid >/dev/null || [ -n "$(leftovers)" ]; then
    log "restarting: stopping what is left of an earlier start"
    do_stop || true
  fi
  if [ ${#sock} -gt 100 ]; then
    log "STATE_DIR path too long for a Unix socket: $sock"
    return 1
  fi
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { log "$b not found: run scripts/slurm/install.sh"; return 1; }
  done
  write_config || return 1
  rm -f "$state"/run/*.pid "$state/munge/munged.pid" "$sock" "$sock.lock"

  munged --socket="$sock" --key-file="$state/munge/munge.key" \
    --log-file="$state/log/munged.log" --pid-file="$state/munge/munged.pid" \
    --seed-file="$state/munge/munged.seed" || { print_logs; do_stop || true; return 1; }
  for ((i = 0; i < 50; i++)); do
    munge -n -S "$sock" 2>/dev/null | unmunge -S "$sock" >/dev/null 2>&1 && break
    sleep 0.1
  done

  # -c: start clean (no jobs from an earlier run of this STATE_DIR).
  slurmctld -c -f "$conf" || { print_logs; do_stop || true; return 1; }
  slurmd -f "$conf" || { print_logs; do_stop || true; return 1; }

  for ((i = 0; i < start_timeout * 4; i++)); do
    st=$(node_state || true)
    case $st in
      idle) break ;;
      drain* | drng | inval | fail*)
        log "node is $st:"
        scontrol show node "$host" >&2 || true
        print_logs
        do_stop || true
        return 1
        ;;
    esac
    if ! ctld_pid >/dev/null || ! slurmd_pid >/dev/null; then
      sleep 0.5 # a daemon may still be writing its pid file
      if ! ctld_pid >/dev/null || ! slurmd_pid >/dev/null; then
        log "a daemon exited during start-up"
        print_logs
        do_stop || true
        return 1
      fi
    fi
    sleep 0.25
  done
  if [ "$st" != idle ]; then
    log "node not idle after ${start_timeout}s (state: ${st:-none})"
    sinfo >&2 || true
    print_logs
    do_stop || true
    return 1
  fi
  pid=$(ctld_pid)
  log "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s: node $host, $cpus CPUs, slurmctld pid $pid, port $ctld_port ($state)"
  print_env
}

do_status() {
  local ok=0 pid name
  for name in munged slurmctld slurmd; do
    case $name in
      munged) pid=$(munged_pid || true) ;;
      slurmctld) pid=$(ctld_pid || true) ;;
      slurmd) pid=$(slurmd_pid || true) ;;
    esac
    if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: not running"; ok=1; fi
  done
  if [ $ok = 0 ]; then
    sinfo -N -o '%N %t %c %P' || ok=1
    squeue || true
  fi
  return $ok
}

case $cmd in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac

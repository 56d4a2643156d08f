#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine (nodes n1, n2; 1 CPU each), for the tests and
# for trying launch/slurm.sbatch without a cluster. Needs root and Debian's slurm-wlm + munge:
#   apt-get install -y slurm-wlm munge
# Usage:
#   bash launch/local_slurm.sh start DIR [PORT]   config, state and logs in DIR; slurmctld on PORT
#                                                 (default 6817), slurmd on PORT+1 and PORT+2
#   export SLURM_CONF=DIR/slurm.conf              then sinfo / sbatch / squeue as usual
#   bash launch/local_slurm.sh stop DIR           stops the slurmctld/slurmd it started
# munged is started when it is not running and left running (other users may need it).
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop DIR [PORT]}
dir=$(mkdir -p "${2:?usage: local_slurm.sh start|stop DIR [PORT]}" && cd "$2" && pwd)
port=${3:-6817}
export SLURM_CONF=$dir/slurm.conf

stop() {
  for f in "$dir"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$f"
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || { echo "local_slurm: /etc/munge/munge.key is missing (reinstall munge)" >&2; exit 1; }
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "local_slurm: munged did not come up" >&2; exit 1
}

write_conf() {
  local host mem
  host=$(hostname)
  mem=$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m > 8000 ? 8000 : m)}' /proc/meminfo)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/pids"
  cat > "$SLURM_CONF" <<CONF
ClusterName=megalite-local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
DefMemPerCPU=1000
ReturnToService=2
SlurmctldPidFile=$dir/pids/slurmctld.daemon.pid
SlurmdPidFile=$dir/pids/slurmd-%n.daemon.pid
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1))-$((port + 2)) CPUs=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

case "$cmd" in
  start)
    [ "$(id -u)" = 0 ] || { echo "local_slurm: needs root (SlurmUser=root, munged)" >&2; exit 1; }
    command -v slurmctld >/dev/null || { echo "local_slurm: slurm is not installed: apt-get install -y slurm-wlm munge" >&2; exit 1; }
    stop
    start_munge
    write_conf
    slurmctld -D -i >"$dir/log/slurmctld.out" 2>&1 & echo $! > "$dir/pids/slurmctld.pid"
    for n in n1 n2; do
      slurmd -D -N "$n" >"$dir/log/slurmd-$n.out" 2>&1 & echo $! > "$dir/pids/slurmd-$n.pid"
    done
    for _ in $(seq 300); do
      if [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ]; then
        echo "local_slurm: 2 idle nodes; export SLURM_CONF=$SLURM_CONF"
        exit 0
      fi
      sleep 0.1
    done
    echo "local_slurm: nodes did not become idle; logs in $dir/log" >&2
    sinfo >&2 || true
    stop
    exit 1 ;;
  stop) stop ;;
  *) echo "usage: local_slurm.sh start|stop DIR [PORT]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real Slurm cluster in a directory, for tests and local trials:
#   tests/slurm/cluster.sh start DIR [NODES]  write DIR/slurm.conf, start munged, slurmctld and NODES slurmd,
#                                             wait until every node is idle, print `export SLURM_CONF=...`
#                                             (and, for NODES > 1, `export PATH=DIR/bin:$PATH`)
#   tests/slurm/cluster.sh stop DIR           stop the daemons by the PIDs in DIR (never by name) and remove
#                                             the network namespaces it made
# NODES=1 (the default) is one node called localhost on this machine's network. NODES > 1 gives each node,
# and the controller, its own network namespace, address (10.213.0.x on a bridge inside the controller's
# namespace), hostname (UTS namespace) and /etc/hosts (bind-mounted in a private mount namespace): node1 ..
# nodeN resolve as they would on a real cluster, and a job's ranks meet over that private network, not over
# loopback. No traffic leaves the namespaces, and `stop` deletes them. Client commands reach the controller
# through the wrappers in DIR/bin, which enter its namespace. Everything else (config, key, sockets, state,
# logs, job-completion log) lives in DIR and the filesystem is shared, as NFS would be; the daemons run as
# root because slurmd must start jobs as the submitting user.
set -euo pipefail

usage() { echo "usage: $0 start DIR [NODES] | stop DIR" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
nodes=${3:-1}
[[ $nodes =~ ^[1-9][0-9]?$ ]] || { echo "cluster.sh: NODES must be 1..99, not '$nodes'" >&2; exit 2; }
subnet=10.213.0
client_tools=(sbatch srun scontrol squeue scancel sinfo)

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_pid_file() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Namespace names are unique per DIR, so two clusters (two test sessions) never share one.
namespace_prefix() { echo "alterds-$(printf %s "$dir" | cksum | cut -d' ' -f1)"; }

# Run "$@" as host NAME: in its network namespace, with its hostname and the cluster's /etc/hosts.
as_host() {
  local name=$1
  shift
  # shellcheck disable=SC2016  # expanded by the inner shell
  nsenter --net="/run/netns/$(namespace_prefix)-$name" unshare --uts --mount --propagation private \
    sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' "$name" "$dir/hosts" "$@"
}

make_network() {
  command -v ip >/dev/null || { echo "cluster.sh: NODES > 1 needs iproute2 (ip)" >&2; exit 1; }
  local prefix i
  prefix=$(namespace_prefix)
  printf '127.0.0.1 localhost\n%s.1 ctl\n' "$subnet" > "$dir/hosts"
  ip netns add "$prefix-ctl"
  echo "$prefix-ctl" > "$dir/netns"
  ip -n "$prefix-ctl" link set lo up
  ip -n "$prefix-ctl" link add br0 type bridge
  ip -n "$prefix-ctl" addr add "$subnet.1/24" dev br0
  ip -n "$prefix-ctl" link set br0 up
  for i in $(seq "$nodes"); do
    ip netns add "$prefix-node$i"
    echo "$prefix-node$i" >> "$dir/netns"
    ip -n "$prefix-ctl" link add "v$i" type veth peer name eth0 netns "$prefix-node$i"
    ip -n "$prefix-ctl" link set "v$i" master br0 up
    ip -n "$prefix-node$i" addr add "$subnet.$((i + 1))/24" dev eth0
    ip -n "$prefix-node$i" link set eth0 up
    ip -n "$prefix-node$i" link set lo up
    echo "$subnet.$((i + 1)) node$i" >> "$dir/hosts"
  done
  # Client commands from outside enter the controller's namespace; inside the cluster they run as they are.
  mkdir -p "$dir/bin"
  for tool in "${client_tools[@]}"; do
    cat > "$dir/bin/$tool" <<WRAPPER
#!/bin/sh
case \$(hostname) in ctl|node[0-9]*) exec $(command -v "$tool") "\$@" ;; esac
exec nsenter --net=/run/netns/$prefix-ctl $(command -v "$tool") "\$@"
WRAPPER
    chmod +x "$dir/bin/$tool"
  done
}

write_config() {
  local controller=$1 memory_mb
  memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10240 / nodes ))
  cat > "$dir/slurm.conf" <<CONF
ClusterName=alterds-test
SlurmctldHost=$controller
SlurmctldPort=$2
SlurmdPort=$3
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
CONF
  if [[ $nodes -eq 1 ]]; then
    echo "NodeName=localhost CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN" >> "$dir/slurm.conf"
    echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
  else
    # The machine's cores are shared out: a node gets at least one.
    local cpus=$(( $(nproc) / nodes > 0 ? $(nproc) / nodes : 1 )) i
    for i in $(seq "$nodes"); do
      echo "NodeName=node$i NodeAddr=$subnet.$((i + 1)) CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN" >> "$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
  fi
}

all_idle() {
  local states
  states=$(sinfo -h -N -o %t 2>/dev/null | sort -u) || return 1
  [[ $states == idle && $(sinfo -h -N -o %N | wc -l) -eq $nodes ]]
}

start() {
  for tool in munged mungekey slurmctld slurmd "${client_tools[@]}"; do
    command -v "$tool" >/dev/null || { echo "cluster.sh: $tool not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
  done
  [[ $(id -u) -eq 0 ]] || { echo "cluster.sh: the daemons must run as root" >&2; exit 1; }
  mkdir -p "$dir"/{munge,spool/ctld,log}
  chmod 700 "$dir/munge"
  [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"
  export SLURM_CONF=$dir/slurm.conf
  local i
  if [[ $nodes -eq 1 ]]; then
    mkdir -p "$dir/spool/d-localhost"
    write_config localhost "$(free_port)" "$(free_port)"
    slurmctld -c   # -c: a fresh cluster, no state from an earlier start
    slurmd -N localhost
  else
    make_network
    export PATH=$dir/bin:$PATH
    write_config "ctl($subnet.1)" 6817 6818
    as_host ctl slurmctld -c
    for i in $(seq "$nodes"); do
      mkdir -p "$dir/spool/d-node$i"
      as_host "node$i" slurmd -N "node$i"
    done
  fi
  for _ in $(seq 100); do
    if all_idle; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      if [[ $nodes -gt 1 ]]; then echo "export PATH=$dir/bin:\$PATH"; fi
      return 0
    fi
    sleep 0.2
  done
  echo "cluster.sh: the nodes did not become idle in 20 s; logs in $dir/log" >&2
  stop
  exit 1
}

stop() {
  local file namespace
  for file in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    stop_pid_file "$file"
  done
  if [[ -f $dir/netns ]]; then
    while read -r namespace; do ip netns del "$namespace" 2>/dev/null || true; done < "$dir/netns"
    rm -f "$dir/netns"
  fi
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests: one slurmctld and one slurmd per simulated node,
# all on 127.0.0.1 with distinct ports (`slurmd -N nodeK`). No systemd, no munge (auth/none).
#
#   cluster.sh install               apt-get install slurm-wlm + munge if slurmctld is missing
#   cluster.sh start DIR [NODES]     write DIR/slurm.conf, start the daemons, wait until all nodes are idle
#   cluster.sh stop DIR              cancel every job, then stop the daemons by the PIDs saved in DIR/pids
#
# After `start`, clients need `export SLURM_CONF=DIR/slurm.conf` (the last line `start` prints).
set -euo pipefail

usage() {
    echo "usage: $0 install | start DIR [NODES] | stop DIR" >&2
    exit 2
}

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "cluster.sh: SLURM is not installed and installing it needs root:" >&2
        echo "  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d (containers) or the missing systemd keeps the packages' own services from starting.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

free_ports() {  # free_ports N -> N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {  # write_conf DIR NODES
    local dir=$1 nodes=$2 host
    host=$(hostname -s)
    read -r -a ports <<<"$(free_ports $((nodes + 1)))"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=disttrain-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may only start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
# Keep finished jobs visible to scontrol show job (there is no sacct without slurmdbd).
MinJobAge=600
InactiveLimit=0
EOF
    local k
    for ((k = 1; k <= nodes; k++)); do
        echo "NodeName=node$k NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[k]} CPUs=2 RealMemory=2048" \
            >>"$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

wait_idle() {  # wait_idle NODES: until sinfo shows every node idle (30 s)
    local nodes=$1 idle
    for _ in $(seq 60); do
        idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$' || true)
        [[ $idle -eq $nodes ]] && return 0
        sleep 0.5
    done
    echo "cluster.sh: only $idle of $nodes nodes became idle; sinfo says:" >&2
    sinfo -N >&2 || true
    return 1
}

start_cluster() {  # start_cluster DIR NODES
    local dir nodes=${2:-2} k
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || usage
    install_slurm
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    if [[ -s $dir/pids ]]; then
        echo "cluster.sh: $dir/pids exists: a cluster may already run there (cluster.sh stop $dir)" >&2
        exit 1
    fi
    write_conf "$dir" "$nodes"
    export SLURM_CONF=$dir/slurm.conf
    setsid slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 </dev/null &
    echo $! >>"$dir/pids"
    for ((k = 1; k <= nodes; k++)); do
        setsid slurmd -D -N "node$k" -f "$SLURM_CONF" >"$dir/log/slurmd-node$k.out" 2>&1 </dev/null &
        echo $! >>"$dir/pids"
    done
    if ! wait_idle "$nodes"; then
        tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
        stop_cluster "$dir"
        exit 1
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

cancel_jobs() {  # cancel every job and wait (KillWait + margin) until none is left
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    [[ -z $jobs ]] && return 0
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 90); do
        [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && return 0
        sleep 0.5
    done
}

stop_cluster() {  # stop_cluster DIR
    local dir=$1 pid
    [[ -f $dir/pids ]] || return 0
    export SLURM_CONF=$dir/slurm.conf
    cancel_jobs
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done <"$dir/pids"
    for _ in $(seq 40); do
        local alive=0
        while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$dir/pids"
        [[ $alive -eq 0 ]] && break
        sleep 0.25
    done
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$dir/pids"
    rm -f "$dir/pids"
}

case ${1:-} in
    install) install_slurm ;;
    start) [[ $# -ge 2 ]] || usage; start_cluster "$2" "${3:-2}" ;;
    stop) [[ $# -eq 2 ]] || usage; stop_cluster "$2" ;;
    *) usage ;;
esac

#!/bin/bash
# A throw-away SLURM cluster on this machine: munged, slurmctld and two slurmd, each with its
# own node entry on 127.0.0.1, for trying launch/slurm.sbatch (and for tests/test_slurm.py).
# It installs nothing: it needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)
# and to run as root (slurmd starts every job's processes as the job's user).
#
#   launch/slurm/local_cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits
#                                              # until both nodes are idle; prints the SLURM_CONF
#   SLURM_CONF=DIR/slurm.conf sbatch --nodes=2 ... launch/slurm.sbatch ...
#   launch/slurm/local_cluster.sh stop DIR    # cancels its jobs, stops what start started (by pid)
#
# Everything lives in DIR (configuration, state, spool, logs, pid files, munge key and socket);
# nothing outside it is changed. The two node entries are named by NODES (default: the first two
# names /etc/hosts gives 127.x addresses, localhost aside); each must resolve, as a cluster's
# node names do, and be distinct (SLURM runs one slurmd per host name). On
# one host both nodes' tasks share the ports of one machine: train with SEGTRAIN_PORTS=job
# (launch/slurm.sbatch), which gives every task of a job its own port.
# Settings (environment): NODES, CPUS (per node; default: this machine's), PORT (first of the
# four ports the daemons use; default: 16800).

set -euo pipefail

usage() {
    echo "usage: $0 start DIR | stop DIR | status DIR" >&2
    exit 2
}
[ "$#" -eq 2 ] || usage
ACTION="$1"
DIR="$(mkdir -p "$2" && cd "$2" && pwd)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, up to 10 s, then SIGKILL
    local pid
    [ -f "$2" ] || return 0
    pid="$(cat "$2")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local_cluster: $1 (pid $pid) did not stop in 10 s; killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$2"
}

stop() {
    if [ -f "$DIR/slurmctld.pid" ] && command -v squeue >/dev/null; then
        local jobs deadline=$((SECONDS + 20))  # for the jobs' processes to end
        jobs="$(timeout 5 squeue --noheader --format=%i 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            timeout 5 scancel --full --quiet $jobs 2>/dev/null || true
            while [ "$SECONDS" -lt "$deadline" ] &&
                  [ -n "$(timeout 5 squeue --noheader --format=%i 2>/dev/null || true)" ]; do
                sleep 0.2
            done
        fi
    fi
    for node in $(cat "$DIR/nodes" 2>/dev/null); do
        stop_pid "slurmd $node" "$DIR/slurmd-$node.pid"
    done
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid munged "$DIR/munged.pid"
}

fail() {
    echo "local_cluster: $*" >&2
    echo "local_cluster: logs in $DIR (slurmctld.log, slurmd-*.log, munged.log); stopping what started" >&2
    stop
    exit 1
}

start() {
    local missing=()
    for tool in munged mungekey slurmctld slurmd sinfo sbatch srun squeue scancel; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "local_cluster: not installed: ${missing[*]} (apt-get install slurm-wlm munge)" >&2
        exit 3
    fi
    [ "$(id -u)" -eq 0 ] || { echo "local_cluster: run as root (slurmd runs jobs as their user)" >&2; exit 3; }
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "local_cluster: a cluster already runs in $DIR (stop it first: $0 stop $DIR)" >&2
        exit 1
    fi
    # Default: the first two names other than localhost (which SLURM reads as this machine's
    # host name) that /etc/hosts gives a loopback address.
    local nodes=(${NODES:-$(awk '$1 ~ /^127\./ { for (i = 2; i <= NF; i++) if ($i != "localhost") print $i }' \
        /etc/hosts | awk '!seen[$0]++' | head -n 2)})
    [ "${#nodes[@]}" -eq 2 ] && [ "${nodes[0]}" != "${nodes[1]}" ] ||
        { echo "local_cluster: NODES must name two distinct nodes other than localhost, got '${nodes[*]}'" \
               "(add two names to the 127.0.0.1 line of /etc/hosts, or set NODES)" >&2; exit 2; }
    for node in "${nodes[@]}"; do
        getent hosts "$node" >/dev/null ||
            { echo "local_cluster: node name '$node' does not resolve (getent hosts $node); set NODES" >&2; exit 2; }
    done
    local cpus="${CPUS:-$(nproc)}" port="${PORT:-16800}"
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR/state" "$DIR/spool"
    echo "${nodes[*]}" > "$DIR/nodes"

    cat > "$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh: a two-node cluster on 127.0.0.1 in $DIR.
ClusterName=segtrain-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=${nodes[0]} NodeHostname=${nodes[0]} NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=${nodes[1]} NodeHostname=${nodes[1]} NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

    [ -f "$DIR/munge.key" ] || mungekey --create --keyfile="$DIR/munge.key" >/dev/null
    chmod 600 "$DIR/munge.key"
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munge.seed" || fail "munged did not start"
    slurmctld -c -f "$CONF" || fail "slurmctld did not start"
    for node in "${nodes[@]}"; do
        slurmd -f "$CONF" -N "$node" || fail "slurmd $node did not start"
    done
    local deadline=$((SECONDS + 30))  # for both nodes to register
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$(timeout 5 sinfo --noheader --responding --states=idle --format=%D 2>/dev/null | head -n 1)" = 2 ]; then
            echo "local_cluster: nodes ${nodes[*]} idle; use SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    timeout 5 sinfo >&2 || true
    fail "the two nodes did not become idle in 30 s"
}

case "$ACTION" in
    start) start ;;
    stop) stop; echo "local_cluster: stopped the cluster in $DIR" ;;
    status) sinfo && squeue ;;
    *) usage ;;
esac

#!/bin/bash
# A single-node Slurm cluster on this machine, for trying slurm/train.sbatch locally and for tests.
#
#   slurm/local_cluster.sh start DIR     # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch / squeue / scontrol talk to it
#   slurm/local_cluster.sh stop DIR      # stops the three daemons by their pid files
#
# Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (this script does
# not install anything; see docs/slurm.md). Everything the daemons write lives under DIR: the
# munge key and socket, Slurm's state and spool, pid files and logs (DIR/log/). DIR and its
# parents must be traversable by everyone (munged refuses a socket in a private directory).
#
# Environment knobs (defaults in brackets):
#   LOCAL_SLURM_CPUS      CPUs the node offers                      [nproc]
#   LOCAL_SLURM_CTLD_PORT slurmctld port                            [6817]
#   LOCAL_SLURM_D_PORT    slurmd port                               [6818]
#   LOCAL_SLURM_NODE      node name (must resolve to 127.0.0.1)     [localhost]
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action="$1"
dir="$(realpath -m "$2")"

cpus="${LOCAL_SLURM_CPUS:-$(nproc)}"
ctld_port="${LOCAL_SLURM_CTLD_PORT:-6817}"
d_port="${LOCAL_SLURM_D_PORT:-6818}"
node="${LOCAL_SLURM_NODE:-localhost}"

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, wait up to 10 s, then KILL
    local name="$1" file="$2" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local_cluster: $name (pid $pid) ignored TERM; killing" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs="$1" what="$2"; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "local_cluster: timed out after ${secs}s waiting for $what; logs in $dir/log" >&2
    return 1
}

start() {
    [ "$(id -u)" -eq 0 ] || { echo "local_cluster: must run as root (slurmd and munged)" >&2; exit 1; }
    for exe in munged munge slurmctld slurmd sinfo; do
        command -v "$exe" >/dev/null || { echo "local_cluster: '$exe' not found; apt-get install -y slurmctld slurmd slurm-client munge" >&2; exit 1; }
    done
    mkdir -p "$dir"/{munge,state,spool,log,run}
    chmod 755 "$dir" "$dir/munge"
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    cat > "$dir/slurm.conf" <<CONF
# Written by slurm/local_cluster.sh: one node, no accounting, no cgroups.
ClusterName=notellm2local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job becomes eligible again after this many seconds (Slurm default 120).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    export SLURM_CONF="$dir/slurm.conf"
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
        || { echo "local_cluster: munged failed; see $dir/log/munged.log" >&2; exit 1; }
    wait_for 10 munged munge -S "$dir/munge/munge.socket" -n
    slurmctld -c -i -f "$dir/slurm.conf" >>"$dir/log/slurmctld.out" 2>&1 \
        || { echo "local_cluster: slurmctld failed; see $dir/log/slurmctld.log" >&2; exit 1; }
    slurmd -N "$node" -f "$dir/slurm.conf" >>"$dir/log/slurmd.out" 2>&1 \
        || { echo "local_cluster: slurmd failed; see $dir/log/slurmd.log" >&2; exit 1; }
    # Up when the node reports idle.
    wait_for 30 "node $node to be idle" bash -c "sinfo -h -n '$node' -o %T | grep -qx idle"
    echo "local Slurm cluster up; run: export SLURM_CONF=$dir/slurm.conf"
}

stop() {
    stop_pidfile slurmd "$dir/run/slurmd.pid"
    stop_pidfile slurmctld "$dir/run/slurmctld.pid"
    stop_pidfile munged "$dir/run/munged.pid"
    echo "local Slurm cluster in $dir stopped"
}

status() {
    local ok=0 f
    for f in munged slurmctld slurmd; do
        if [ -f "$dir/run/$f.pid" ] && kill -0 "$(cat "$dir/run/$f.pid")" 2>/dev/null; then
            echo "$f: running (pid $(cat "$dir/run/$f.pid"))"
        else
            echo "$f: not running"; ok=1
        fi
    done
    return $ok
}

case "$action" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac

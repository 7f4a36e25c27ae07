#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing `--profile slurm`.
#
#   .ci/slurm.sh start   install slurm-wlm and munge (Debian, as root) if
#                        missing, write /etc/slurm/slurm.conf, start munged,
#                        slurmctld and slurmd; state under $SLURM_STATE
#   .ci/slurm.sh stop    stop the daemons it started, by their pid files
#
# slurm.conf must sit at /etc/slurm/slurm.conf (not only $SLURM_CONF), or srun
# inside jobs fails. No accounting storage: job states come from squeue.
set -euo pipefail

STATE=${SLURM_STATE:-/tmp/leukflow-slurm}
CPUS=$(nproc)
# RealMemory below the machine's, so that slurmd accepts the node.
MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))

start() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    mkdir -p "$STATE"/{ctld,d,log} /etc/slurm /etc/munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chmod 400 /etc/munge/munge.key
    munged --force --pid-file="$STATE/munged.pid"

    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=leukflow-ci
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MinJobAge=3600
NodeName=$(hostname -s) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld
    slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm.sh: the node did not come up; see $STATE/log/" >&2
    cat "$STATE"/log/*.log >&2 || true
    return 1
}

stop() {
    for daemon in slurmd slurmctld munged; do
        pidfile="$STATE/$daemon.pid"
        if [ -s "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

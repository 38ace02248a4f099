#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm.py (CPU tasks, gloo).
#
#   bash .ci/slurm-setup.sh install   # apt-get install slurm-wlm + munge (Debian packages); idempotent
#   bash .ci/slurm-setup.sh start     # write the configs, start munged, slurmctld, slurmd; wait until idle
#                                     # (a fresh cluster: daemons of an earlier start are stopped and the
#                                     # jobs they saved are cleared, so no leftover job holds the node)
#   bash .ci/slurm-setup.sh stop      # stop the daemons that `start` started (by their pid files)
#   bash .ci/slurm-setup.sh status    # exit 0 when the cluster answers and the node is up
#   bash .ci/slurm-setup.sh env       # print `export SLURM_CONF=...` for a shell
#
# Must run as root (the daemons run as root). Everything lives under $ETTIN_SLURM_DIR
# (default /tmp/ettin-slurm): slurm.conf, cgroup.conf, state, spool, logs and pid files. Clients find
# the config through SLURM_CONF; /etc/slurm/slurm.conf is linked to it only when that file is absent.
# Settings that make slurmd work unprivileged-container style (gVisor, Docker without systemd):
# ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, CgroupPlugin=autodetect + IgnoreSystemd=yes.
set -euo pipefail

DIR="${ETTIN_SLURM_DIR:-/tmp/ettin-slurm}"
CONF="$DIR/etc/slurm.conf"
NODE="$(hostname -s)"
# At least 4 CPUs are declared (more than a 2-core CI machine has, on purpose): two 2-task test
# jobs can then run side by side, and they spend much of their time waiting.
CPUS="${ETTIN_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "slurm-setup: must run as root" >&2; exit 1; fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        echo "slurm-setup: slurm-wlm and munge already installed"
        return
    fi
    need_root
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    echo "slurm-setup: installed slurm $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || true)"
}

write_configs() {
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    cat >"$CONF" <<EOF
# Written by .ci/slurm-setup.sh: one node ($NODE, $CPUS CPUs), everything as root, no accounting.
ClusterName=ettin-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s later (default 120 s; 5 is the minimum).
AuthInfo=cred_expire=${ETTIN_SLURM_CRED_EXPIRE:-5}
CredType=cred/munge
SlurmctldPort=${ETTIN_SLURMCTLD_PORT:-6817}
SlurmdPort=${ETTIN_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# Run the scheduler every 2 s (default 60): a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MessageTimeout=20
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/cgroup.conf" <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
    if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
        mkdir -p /etc/slurm
        ln -sfn "$CONF" /etc/slurm/slurm.conf
    fi
}

alive() {  # pid file -> running?
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_ready() {
    SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

start() {
    need_root
    command -v slurmctld >/dev/null || { echo "slurm-setup: run '$0 install' first" >&2; exit 1; }
    stop >/dev/null
    write_configs
    export SLURM_CONF="$CONF"
    # munge: the package's key, or a fresh one.
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if ! alive /run/munge/munged.pid; then
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- munged
        else
            munged --force
        fi
        touch "$DIR/run/munged.ours"
    fi
    # -c: start without the jobs an earlier controller saved in $DIR/state.
    slurmctld -c -f "$CONF"
    slurmd -f "$CONF" -N "$NODE"
    for _ in $(seq 1 60); do
        if node_ready; then
            echo "slurm-setup: cluster up: node $NODE, $CPUS CPUs (SLURM_CONF=$CONF)"
            return
        fi
        # A node left DOWN/DRAINED by an earlier run of this script comes back here.
        SLURM_CONF="$CONF" scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm-setup: the node did not become idle; logs:" >&2
    tail -n 30 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    SLURM_CONF="$CONF" sinfo >&2 || true
    exit 1
}

stop_pid() {  # pid file, name
    if alive "$1"; then
        local pid
        pid="$(cat "$1")"
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        echo "slurm-setup: stopped $2 ($pid)"
    fi
}

stop() {
    stop_pid "$DIR/run/slurmd.pid" slurmd
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    if [ -f "$DIR/run/munged.ours" ]; then
        stop_pid /run/munge/munged.pid munged
        rm -f "$DIR/run/munged.ours"
    fi
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
}

status() {
    if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_ready; then
        echo "slurm-setup: running (SLURM_CONF=$CONF)"
        SLURM_CONF="$CONF" sinfo
    else
        echo "slurm-setup: not running"
        return 1
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac

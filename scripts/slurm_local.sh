#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, to run hydra/launcher=slurm sweeps for real on a
# CPU: munged (auth), MariaDB + slurmdbd (accounting: submitit reads job states with sacct),
# slurmctld and slurmd, all started without systemd, as root.
#
#   scripts/slurm_local.sh start   # idempotent: installs what is missing (apt), starts what
#                                  # is not running; prints `export SLURM_CONF=...`
#   scripts/slurm_local.sh stop    # stops everything it started
#   scripts/slurm_local.sh env     # prints `export SLURM_CONF=...`
#
# Everything lives in $KEYFRAMES_SLURM_DIR (default /tmp/keyframes-slurm): configs, munge key,
# database, state, spool, logs, pid files. One exception: munged's socket is at the standard
# /run/munge/munge.socket.2, because Slurm's accounting clients (sacct, sacctmgr) look for it
# only there. Partitions: `main` (no time limit) and `short` (2 minutes, for time-limit tests).
# Ports 16817-16819 (slurmctld, slurmd, slurmdbd) and 16306 (MariaDB, 127.0.0.1 only).
set -euo pipefail
dir=$(realpath -m "${KEYFRAMES_SLURM_DIR:-/tmp/keyframes-slurm}")
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
    local limit=$1; shift
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "slurm_local: gave up waiting for: $*" >&2; return 1
}

install() {
    command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null \
        && command -v munged >/dev/null && command -v mariadbd >/dev/null && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm_local: SLURM is not installed, and installing it needs root and apt" >&2
        return 1
    fi
    (apt-get update -qq || true)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

write_configs() {
    mkdir -p "$dir"/{munge,state,spool,log,db}
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
    local cpus memory
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
    cat > "$conf" <<EOF
ClusterName=keyframes
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
JobAcctGatherType=jobacct_gather/none
KillWait=5
MinJobAge=600
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost MaxTime=2 State=UP
EOF
    cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=16306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf"
}

start() {
    install
    write_configs
    if ! alive "$dir/munge/munged.pid"; then
        mkdir -p /run/munge
        munged --key-file="$dir/munge/munge.key" --socket=/run/munge/munge.socket.2 \
            --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
            --seed-file="$dir/munge/munged.seed" --force
    fi
    if ! alive "$dir/mariadb.pid"; then
        [ -d "$dir/db/mysql" ] || mariadb-install-db --user=root --datadir="$dir/db" \
            --auth-root-authentication-method=normal --skip-test-db > "$dir/log/mariadb-install.log" 2>&1
        mariadbd --user=root --datadir="$dir/db" --socket="$dir/mysql.sock" --port=16306 \
            --bind-address=127.0.0.1 --pid-file="$dir/mariadb.pid" \
            --log-error="$dir/log/mariadb.log" > /dev/null 2>&1 &
        wait_for 60 mariadb --socket="$dir/mysql.sock" -uroot -e "select 1"
        mariadb --socket="$dir/mysql.sock" -uroot -e "
            create user if not exists 'slurm'@'127.0.0.1' identified by 'slurm';
            grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1';"
    fi
    alive "$dir/slurmdbd.pid" || slurmdbd
    wait_for 60 sacctmgr -n list cluster
    sacctmgr -n list cluster | grep -q keyframes || sacctmgr -i add cluster keyframes >/dev/null
    alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
    alive "$dir/slurmd.pid" || slurmd -f "$conf"
    wait_for 60 sh -c "sinfo -h -o %T -p main | grep -qx idle"
    echo "export SLURM_CONF=$conf"
}

stop() {
    for pid in slurmd slurmctld slurmdbd mariadb munge/munged; do
        if alive "$dir/$pid.pid"; then
            kill "$(cat "$dir/$pid.pid")"
            for _ in $(seq 30); do alive "$dir/$pid.pid" || break; sleep 1; done
        fi
    done
}

case "${1:-}" in
start) start ;;
stop) stop ;;
env) echo "export SLURM_CONF=$conf" ;;
*) echo "usage: scripts/slurm_local.sh start|stop|env" >&2; exit 2 ;;
esac

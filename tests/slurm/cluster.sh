#!/usr/bin/env bash
# A single-node SLURM on this machine, to try and test hydra/launcher=slurm against the real thing:
#   tests/slurm/cluster.sh start   installs Debian's SLURM, munge, slurmdbd and MariaDB (once), writes the
#                                  configuration, starts the daemons and waits until the node is idle;
#   tests/slurm/cluster.sh stop    stops every daemon that start started, by its process id.
# This host is the controller and the one compute node, with its real CPUs and memory. Runs as root, on
# Debian or Ubuntu, without systemd: the daemons run in the foreground, in the background of this shell.
# slurmdbd (accounting, in MariaDB on 127.0.0.1) is what lets sacct, and so submitit, see a job's state.
# State, logs and process ids live in $DEEPCNN_SLURM_DIR (default /tmp/deepcnn-slurm).
set -euo pipefail

DIR="${DEEPCNN_SLURM_DIR:-/tmp/deepcnn-slurm}"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by deepcnn tests/slurm/cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
DB_SOCKET=/run/mysqld/deepcnn-slurm.sock
DB_PASSWORD=deepcnn-slurm
WAIT_S=60

fail() { echo "cluster.sh: $*" >&2; exit 1; }

alive() { [[ -f "$DIR/pids/$1" ]] && kill -0 "$(cat "$DIR/pids/$1")" 2>/dev/null; }

# Runs a daemon in the background, its output in $DIR/log/NAME.log, its process id in $DIR/pids/NAME.
launch() {
    local name=$1; shift
    "$@" >>"$DIR/log/$name.log" 2>&1 &
    echo $! >"$DIR/pids/$name"
}

wait_until() {
    local what=$1; shift
    for _ in $(seq $((WAIT_S * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "$what within $WAIT_S s; see the logs in $DIR/log"
}

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || fail "needs apt-get (Debian or Ubuntu) to install ${missing[*]}"
    apt-cache show "${missing[0]}" >/dev/null 2>&1 || apt-get update -qq
    # No package starts its service here: this script starts the daemons itself.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || { [[ -n $made_policy ]] && rm -f "$policy"; fail "apt-get install ${missing[*]} failed"; }
    [[ -n $made_policy ]] && rm -f "$policy"
    return 0
}

refuse_foreign_config() {
    for file in "$CONF" "$DBD_CONF"; do
        if [[ -e $file ]] && ! grep -qF "$MARK" "$file"; then
            fail "$file exists and was not written by this script; move it away to run the test cluster here"
        fi
    done
}

write_config() {
    local host cpus memory_mb
    host=$(hostname -s)
    cpus=$(nproc)
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mkdir -p /etc/slurm "$DIR"/{state,spool,log,pids}
    cat >"$CONF.tmp" <<CONF
$MARK
ClusterName=deepcnn
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups here: processes are tracked by their parent ids, and tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
# A job may be requeued (submitit requeues a preempted or timed-out job with scontrol requeue).
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    mv "$CONF.tmp" "$CONF"
    (umask 077 && cat >"$DBD_CONF.tmp" <<CONF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
CONF
    )
    mv "$DBD_CONF.tmp" "$DBD_CONF"
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
        chown munge:munge /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    launch munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
    wait_until "munged did not answer" munge -n
}

start_database() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    launch mariadb mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=127.0.0.1 --port=3306 \
        --socket="$DB_SOCKET" --pid-file=/run/mysqld/deepcnn-slurm.pid
    wait_until "MariaDB did not answer" mariadb --socket="$DB_SOCKET" -e "SELECT 1"
    mariadb --socket="$DB_SOCKET" <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

node_idle() { [[ $(sinfo --noheader --responding --states=idle --format=%n 2>/dev/null) == "$(hostname -s)" ]]; }

start() {
    [[ $(id -u) -eq 0 ]] || fail "start needs root (it installs packages and runs the daemons)"
    if alive slurmctld && alive slurmd && node_idle; then
        echo "cluster.sh: already running; node $(hostname -s) idle"
        return
    fi
    stop >/dev/null
    # A start that fails leaves no daemon behind.
    trap 'stop >/dev/null' EXIT
    refuse_foreign_config
    install_packages
    write_config
    start_munge
    start_database
    launch slurmdbd slurmdbd -D
    wait_until "slurmdbd did not answer" sacctmgr --noheader list cluster
    launch slurmctld slurmctld -D -i
    wait_until "slurmctld did not answer" scontrol ping
    launch slurmd slurmd -D
    wait_until "the node did not become idle" node_idle
    trap - EXIT
    echo "cluster.sh: node $(hostname -s) idle ($(nproc) CPUs); logs in $DIR/log"
}

stop() {
    [[ -d $DIR/pids ]] || return 0
    # The compute daemon first and the database last, each waited for before the next.
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        if alive "$name"; then
            local pid
            pid=$(cat "$DIR/pids/$name")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            echo "cluster.sh: stopped $name ($pid)"
        fi
        rm -f "$DIR/pids/$name"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) fail "usage: tests/slurm/cluster.sh start|stop" ;;
esac

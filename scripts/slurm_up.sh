#!/usr/bin/env bash
# scripts/slurm_up.sh - bring up a throw-away, REAL Slurm 22.05 cluster (Debian packages) on this
# single host, for epkit's launch tests (they submit deployments through submitit).
#
# Idempotent: installs missing packages, (re)writes the configs, starts only what is not
# running (restarts everything if the generated config changed), waits until all nodes are
# idle, then runs a 1-second srun smoke test. Fast (< 1 s) when already up.
# Undo with scripts/slurm_down.sh [--purge]. Must run as root. No systemd needed.
#
# Layout: nodes n1..nN. In "netns" mode each node's slurmd runs in its own network namespace
# (address 10.199.0.i on bridge slbr0, controller at 10.199.0.254) and UTS namespace
# (hostname n<i>), so tasks on different nodes have different hostnames, IPs and ports, like
# the primary/headless layout of a real multi-node deployment. In "multi" mode all slurmds
# share the host network (distinct SlurmdPorts; hostname() is the same for all nodes).
# Accounting: slurmdbd + a private MariaDB (datadir under $SLURMLAB_DIR, 127.0.0.1:16033) so
# that `sacct` works - submitit polls job states with sacct; without it a cancelled job's
# result() never returns.
#
# Knobs (environment):
#   SLURMLAB_DIR      state/logs/DB live in $SLURMLAB_DIR/state   (default /tmp/epkit-slurm)
#   SLURM_NODES       number of emulated nodes                    (default 2)
#   SLURM_MODE        netns | multi | auto                        (default auto = netns if possible)
#   SLURM_NODE_CPUS   CPUs per node; may exceed the real cores    (default 4)
#   SLURM_NODE_GPUS   fake GPUs per node (gres gpu, 0 = none)     (default 4)
#   SLURM_ACCOUNTING  1 = slurmdbd+MariaDB, 0 = none (no sacct!)  (default 1)
# Prints "SLURM_BRIDGE_ADDR=<addr>" last: the address jobs use to reach services on this host.
set -euo pipefail

LAB=${SLURMLAB_DIR:-/tmp/epkit-slurm}
ST=$LAB/state
NODES=${SLURM_NODES:-2}
MODE=${SLURM_MODE:-auto}
CPUS=${SLURM_NODE_CPUS:-4}
GPUS=${SLURM_NODE_GPUS:-4}
ACCT=${SLURM_ACCOUNTING:-1}
CLUSTER=epkitci
NET=10.199.0          # private subnet for the test hosts (netns mode); never leaves this machine
BR=slbr0
DB_PORT=16033
DBD_PORT=6819
CONF=/etc/slurm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

T0=$(date +%s%N)
log() { printf '[slurm_up +%5dms] %s\n' $(( ($(date +%s%N) - T0) / 1000000 )) "$*"; }
die() { log "ERROR: $*"; exit 1; }
# alive PIDFILE: the pid in PIDFILE runs (not a zombie) and its name matches the file's daemon
alive() {
  local pid name s; [ -s "$1" ] || return 1
  pid=$(cat "$1"); name=$(basename "$1" .pid); name=${name%%-*}; name=${name/mysqld/mariadbd}
  s=$(ps -o stat=,comm= -p "$pid" 2>/dev/null) || return 1
  [[ $s != Z* && $s == *" $name"* ]]
}
wait_for() { # wait_for SECONDS WHAT CMD... : poll CMD every 0.1 s
  local end=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out waiting for $what"
    sleep 0.1
  done
}
[ "$(id -u)" = 0 ] || die "must be run as root"

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
MISSING=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || MISSING="$MISSING $p"
done
if [ -n "$MISSING" ]; then
  log "installing:$MISSING"
  OWN_POLICY=0   # keep postinst scripts from starting the packaged services
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && OWN_POLICY=1
  fi
  rc=0
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      --no-install-recommends $MISSING; } > "/tmp/epkit-slurm-apt.log" 2>&1 || rc=$?
  [ "$OWN_POLICY" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || { tail -20 /tmp/epkit-slurm-apt.log; die "apt-get failed (rc=$rc)"; }
  log "installed $(dpkg-query -W -f='${Version}' slurmctld) slurm"
fi

# ---------------------------------------------------------------- 2. mode + config
if [ "$MODE" = auto ]; then
  MODE=multi
  if [ -e /run/netns/slurmlab-n1 ] || { ip netns add slurmlab-probe 2>/dev/null && ip netns del slurmlab-probe; }; then
    if ip link show "$BR" >/dev/null 2>&1 || { ip link add slurmlab-pbr type bridge 2>/dev/null && ip link del slurmlab-pbr; }; then
      MODE=netns
    fi
  fi
fi
case $MODE in netns|multi) ;; *) die "SLURM_MODE must be netns, multi or auto";; esac

CTL_HOST=$(hostname -s)
if [ "$MODE" = netns ]; then CTL_ADDR=$NET.254; else CTL_ADDR=127.0.0.1; fi
MEM=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 / NODES ))
mkdir -p "$ST"/{ctld,log,run,fakedev} "$CONF"
for i in $(seq 1 "$NODES"); do mkdir -p "$ST/spool/n$i"; done

GRES=""; GRES_FILE=""
if [ "$GPUS" -gt 0 ]; then
  for g in $(seq 0 $((GPUS - 1))); do   # /dev/null-like char devices: Slurm only stats them
    [ -e "$ST/fakedev/nvidia$g" ] || mknod "$ST/fakedev/nvidia$g" c 1 3
  done
  GRES=" Gres=gpu:$GPUS"
  if [ "$GPUS" = 1 ]; then GRES_FILE=$ST/fakedev/nvidia0; else GRES_FILE="$ST/fakedev/nvidia[0-$((GPUS - 1))]"; fi
fi

NODE_LINES=""; HOSTS_LINES=""
for i in $(seq 1 "$NODES"); do
  if [ "$MODE" = netns ]; then
    NODE_LINES+="NodeName=n$i NodeHostname=n$i NodeAddr=$NET.$i CPUs=$CPUS RealMemory=$MEM$GRES State=UNKNOWN"$'\n'
    HOSTS_LINES+="$NET.$i n$i"$'\n'
  else
    NODE_LINES+="NodeName=n$i NodeHostname=$CTL_HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$MEM$GRES State=UNKNOWN"$'\n'
    HOSTS_LINES+="127.0.10.$i n$i"$'\n'
  fi
done
if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT"
else  # no sacct for submitit! (only `sacct -c` reads the jobcomp file)
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ST/log/jobcomp.txt"
fi

NEW=$ST/run/new; rm -rf "$NEW"; mkdir -p "$NEW"
cat > "$NEW/slurm.conf" <<EOF
# generated by slurm_up.sh ($MODE mode, $NODES nodes) - single-host test cluster
ClusterName=$CLUSTER
SlurmctldHost=$CTL_HOST($CTL_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$ST/ctld
SlurmdSpoolDir=$ST/spool/%n
SlurmctldPidFile=$ST/run/slurmctld.pid
SlurmdPidFile=$ST/run/slurmd-%n.pid
SlurmctldLogFile=$ST/log/slurmctld.log
SlurmdLogFile=$ST/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=2
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$ACCT_LINES
GresTypes=gpu
${NODE_LINES}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if [ "$GPUS" -gt 0 ]; then
  echo "NodeName=n[1-$NODES] Name=gpu File=$GRES_FILE" > "$NEW/gres.conf"
else
  : > "$NEW/gres.conf"
fi
cat > "$NEW/slurmdbd.conf" <<EOF
# generated by slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$ST/run/slurmdbd.pid
LogFile=$ST/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
cat > "$NEW/mariadb.cnf" <<EOF
[mysqld]
datadir=$ST/mysql
socket=$ST/run/mysqld.sock
pid-file=$ST/run/mysqld.pid
bind-address=127.0.0.1
port=$DB_PORT
log-error=$ST/log/mariadb.log
user=root
skip-name-resolve
innodb_buffer_pool_size=128M
innodb_log_file_size=32M
innodb_lock_wait_timeout=900
EOF
SHA=$(printf '%s|%s|' "$MODE" "$ACCT" | cat - "$NEW"/* | sha256sum | cut -c1-16)

node_pids_ok() { for i in $(seq 1 "$NODES"); do alive "$ST/run/slurmd-n$i.pid" || return 1; done; }
all_alive() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || return 1
  if [ "$ACCT" = 1 ]; then alive "$ST/run/mysqld.pid" && alive "$ST/run/slurmdbd.pid" || return 1; fi
  alive "$ST/run/slurmctld.pid" && node_pids_ok
}
if [ "$(cat "$ST/run/config.sha" 2>/dev/null)" = "$SHA" ] && all_alive \
   && cmp -s "$NEW/slurm.conf" "$CONF/slurm.conf"; then
  log "already running with this config ($MODE mode, sha $SHA)"
else
  if ls "$ST"/run/*.pid >/dev/null 2>&1; then
    log "config changed or something is down: restarting"
    "$HERE/slurm_down.sh" >/dev/null
  fi
  install -m 644 "$NEW/slurm.conf" "$CONF/slurm.conf"
  install -m 644 "$NEW/gres.conf" "$CONF/gres.conf"
  install -m 600 "$NEW/slurmdbd.conf" "$CONF/slurmdbd.conf"
  install -m 644 "$NEW/mariadb.cnf" "$ST/mariadb.cnf"
  echo "$SHA" > "$ST/run/config.sha"
  echo "$MODE" > "$ST/run/mode"
fi

# ---------------------------------------------------------------- 3. /etc/hosts block
{ sed '/^# BEGIN epkit-slurm/,/^# END epkit-slurm/d' /etc/hosts
  printf '# BEGIN epkit-slurm (slurm_up.sh)\n%s# END epkit-slurm\n' "$HOSTS_LINES"; } > "$ST/run/hosts.new"
cmp -s "$ST/run/hosts.new" /etc/hosts || cat "$ST/run/hosts.new" > /etc/hosts   # in place: /etc/hosts may be a bind mount

# ---------------------------------------------------------------- 4. network namespaces
if [ "$MODE" = netns ]; then
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr replace "$CTL_ADDR/24" dev "$BR"
  ip link set "$BR" up
  for i in $(seq 1 "$NODES"); do
    ns=slurmlab-n$i
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    ip link show "vh-n$i" >/dev/null 2>&1 || ip link add "vh-n$i" type veth peer name eth0 netns "$ns"
    ip link set "vh-n$i" master "$BR" up
    ip -n "$ns" addr replace "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
fi

# ---------------------------------------------------------------- 5. munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key \
      && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  cp /run/munge/munged.pid "$ST/run/munged.pid"   # marks munged as ours (down stops it)
  wait_for 10 munged sh -c 'munge -n | unmunge'
  log "munged started"
fi

# ---------------------------------------------------------------- 6. MariaDB + slurmdbd
if [ "$ACCT" = 1 ]; then
  if ! alive "$ST/run/mysqld.pid"; then
    if [ ! -d "$ST/mysql/mysql" ]; then
      rm -rf "$ST/mysql"
      mariadb-install-db --defaults-file="$ST/mariadb.cnf" --auth-root-authentication-method=normal \
        --skip-test-db > "$ST/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $ST/log/mariadb-install.log"
    fi
    setsid /usr/sbin/mariadbd --defaults-file="$ST/mariadb.cnf" </dev/null >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb-admin --no-defaults -S "$ST/run/mysqld.sock" -uroot ping
    wait_for 5 mysqld.pid test -s "$ST/run/mysqld.pid"
    mariadb --no-defaults -S "$ST/run/mysqld.sock" -uroot -e \
      "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    log "MariaDB up on 127.0.0.1:$DB_PORT"
  fi
  if ! alive "$ST/run/slurmdbd.pid"; then
    slurmdbd </dev/null >/dev/null 2>&1
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
    log "slurmdbd up"
  fi
fi

# ---------------------------------------------------------------- 7. slurmctld + slurmd
if ! alive "$ST/run/slurmctld.pid"; then
  slurmctld </dev/null >/dev/null 2>&1
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
  log "slurmctld up"
fi
for i in $(seq 1 "$NODES"); do
  alive "$ST/run/slurmd-n$i.pid" && continue
  if [ "$MODE" = netns ]; then
    # nsenter (not `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup from slurmd)
    nsenter --net="/run/netns/slurmlab-n$i" -- unshare --uts -- \
      sh -c "hostname n$i && exec slurmd -N n$i" </dev/null >/dev/null 2>&1
  else
    slurmd -N "n$i" </dev/null >/dev/null 2>&1
  fi
done

# ---------------------------------------------------------------- 8. wait until idle + smoke test
nodes_ready() {
  local s; s=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$(sinfo -h -N -o '%N' 2>/dev/null | sort -u | wc -l)" = "$NODES" ] || return 1
  [ -n "$s" ] && ! grep -qvE '^((idle|mix|alloc) )+$' <<<"$s"
}
end=$(( $(date +%s) + 60 ))
until nodes_ready; do
  [ "$(date +%s)" -lt "$end" ] || { sinfo -N -l; die "nodes not idle after 60 s (logs: $ST/log)"; }
  if [ "$(date +%s)" -gt $(( end - 50 )) ]; then   # after ~10 s, undo stale DOWN/DRAIN from old state
    for n in $(sinfo -h -N -t down,drain -o '%N' 2>/dev/null); do scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
  fi
  sleep 0.2
done
if [ "$ACCT" = 1 ]; then
  wait_for 30 "cluster registration in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
SMOKE=$(timeout 30 srun -N "$NODES" --ntasks-per-node=1 -t 1 hostname 2>&1 | sort | tr '\n' ' ') \
  || die "srun smoke test failed: $SMOKE"
log "cluster '$CLUSTER' ready: $MODE mode, $NODES nodes x $CPUS CPUs, ${GPUS} fake GPUs/node, accounting=$ACCT; srun -> $SMOKE"
sinfo
echo "SLURM_BRIDGE_ADDR=$CTL_ADDR"

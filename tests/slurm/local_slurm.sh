# A throw-away one-node Slurm on this machine, for tests/slurm/test_*.sh (sourced, bash).
#
#   . tests/slurm/local_slurm.sh
#   local_slurm_start DIR || { echo "SKIP slurm: $LOCAL_SLURM_WHY"; exit 0; }
#   ... sbatch / squeue / essence-run --executor slurm ...   (SLURM_CONF is exported)
#   local_slurm_stop            (kills, by PID, only the daemons started here)
#
# munged, slurmctld and slurmd run in the foreground as children of this shell, every file of
# theirs (key, socket, state, spool, logs, configuration) under DIR, on ports picked at random, so
# the test neither needs nor disturbs a Slurm or munge already installed on the machine. No
# accounting storage: sacct has nothing to say here, which is the case essence-run's --wait must
# handle. Needs root (slurmd starts jobs as their users) and the slurm-wlm and munge packages.

LOCAL_SLURM_PIDS=()
LOCAL_SLURM_WHY=

local_slurm_start() { # DIR
    local dir=$1 host cpus port tries
    LOCAL_SLURM_DIR=$dir
    if [ "$(id -u)" != 0 ]; then LOCAL_SLURM_WHY="needs root to run slurmd"; return 1; fi
    for bin in munged slurmctld slurmd sbatch squeue scontrol; do
        command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || {
            LOCAL_SLURM_WHY="$bin not found (apt-get install slurm-wlm munge)"; return 1; }
    done
    export PATH=$PATH:/usr/sbin
    host=$(hostname -s) cpus=$(nproc)
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge" || return 1
    chmod 700 "$dir" "$dir/munge"

    # munge: a fresh key, its socket in DIR. --force: the key and folders belong to root.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$dir/munge/munge.key" || return 1
    munged --foreground --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" >"$dir/munge/stdout.log" 2>&1 &
    LOCAL_SLURM_PIDS+=($!)

    port=$((20000 + RANDOM % 20000))
    cat >"$dir/slurm.conf" <<CONF
ClusterName=essencetest
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
DefMemPerCPU=64
NodeName=$host CPUs=$cpus RealMemory=$((64 * cpus + 64)) State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf

    # munge first: the daemons authenticate with it as they start.
    for tries in $(seq 50); do [ -S "$dir/munge/socket" ] && break; sleep 0.1; done
    [ -S "$dir/munge/socket" ] || { LOCAL_SLURM_WHY="munged did not start: $(tail -n 3 "$dir/munge/stdout.log" "$dir/munge/munged.log" 2>/dev/null | tr '\n' ' ')"; return 1; }
    slurmctld -D -i -f "$dir/slurm.conf" >"$dir/slurmctld.stdout" 2>&1 &
    LOCAL_SLURM_PIDS+=($!)
    slurmd -D -f "$dir/slurm.conf" >"$dir/slurmd.stdout" 2>&1 &
    LOCAL_SLURM_PIDS+=($!)
    for tries in $(seq 150); do
        sinfo -h -o %t 2>/dev/null | grep -qx idle && return 0
        sleep 0.2
    done
    LOCAL_SLURM_WHY="the one-node Slurm did not come up in 30 s: $(tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" 2>/dev/null | tr '\n' ' ')"
    return 1
}

local_slurm_stop() {
    local pid i
    for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for i in $(seq 50); do
        local alive=0
        for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    LOCAL_SLURM_PIDS=()
}

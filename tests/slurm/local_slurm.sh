# A throw-away one-node Slurm on this machine, for tests/slurm/test_*.sh (sourced, bash).
#
#   . tests/slurm/local_slurm.sh
#   local_slurm_start DIR       0: up, SLURM_CONF exported; 2: cannot run here (not root, no
#                               Slurm or munge: skip), 1: failed to start; $LOCAL_SLURM_WHY says why
#   ... sbatch / squeue / essence-run --executor slurm ...
#   local_slurm_stop            cancels the jobs, then stops the daemons started here, by PID
#
# munged, slurmctld and slurmd run in the foreground as children of this shell, every file of
# theirs (key, socket, state, spool, logs, configuration) under DIR, on ports picked at random,
# so the test neither needs nor disturbs a Slurm or munge installed on the machine. No accounting
# storage: sacct has nothing to say here, the case essence-run's --wait must handle. Needs root
# (slurmd runs jobs as their owners; SlurmUser=root) and the slurm-wlm and munge packages.

LOCAL_SLURM_PIDS=()
LOCAL_SLURM_WHY=

# _local_slurm_up: waits until the node is idle (0), or a daemon has died or 30 s passed (1).
_local_slurm_up() {
    local i pid
    for i in $(seq 150); do
        sinfo -h -o %t 2>/dev/null | grep -qx idle && return 0
        for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
        sleep 0.2
    done
    return 1
}

local_slurm_start() { # DIR
    local dir=$1 host cpus port attempt bin
    if [ "$(id -u)" != 0 ]; then LOCAL_SLURM_WHY="needs root to run slurmd"; return 2; fi
    export PATH=$PATH:/usr/sbin
    for bin in munged slurmctld slurmd sbatch squeue scancel sinfo; do
        command -v "$bin" >/dev/null || { LOCAL_SLURM_WHY="$bin not found (apt-get install slurm-wlm munge)"; return 2; }
    done
    host=$(hostname -s) cpus=$(nproc)
    mkdir -p "$dir/munge" && chmod 700 "$dir" "$dir/munge" || { LOCAL_SLURM_WHY="cannot create $dir"; return 1; }

    # munge: a fresh key, its socket in DIR (--force: key and folders are root's, as munged
    # would not otherwise accept).
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$dir/munge/munge.key" || {
        LOCAL_SLURM_WHY="cannot write $dir/munge/munge.key"; return 1; }
    munged --foreground --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" >"$dir/munge/stdout.log" 2>&1 &
    LOCAL_SLURM_PIDS+=($!)
    for attempt in $(seq 50); do [ -S "$dir/munge/socket" ] && break; sleep 0.1; done
    [ -S "$dir/munge/socket" ] || {
        LOCAL_SLURM_WHY="munged did not start: $(tail -n 3 "$dir/munge/stdout.log" "$dir/munge/munged.log" 2>/dev/null | tr '\n' ' ')"
        return 1; }

    # Three tries on random ports, in case one is taken.
    for attempt in 1 2 3; do
        rm -rf "$dir/state" "$dir/spool" && mkdir -p "$dir/state" "$dir/spool"
        port=$((20000 + RANDOM % 20000))
        # The node is the host (slurmd checks NodeName against `hostname -s`), reached at
        # 127.0.0.1 so that nothing depends on the host name resolving.
        cat >"$dir/slurm.conf" <<CONF
ClusterName=essencetest
SlurmctldHost=$host(127.0.0.1)
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
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$((64 * cpus + 64)) State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
        export SLURM_CONF=$dir/slurm.conf
        slurmctld -D -i -f "$dir/slurm.conf" >"$dir/slurmctld.stdout" 2>&1 &
        LOCAL_SLURM_PIDS+=($!)
        slurmd -D -f "$dir/slurm.conf" >"$dir/slurmd.stdout" 2>&1 &
        LOCAL_SLURM_PIDS+=($!)
        _local_slurm_up && return 0
        LOCAL_SLURM_WHY="the one-node Slurm did not come up: $(tail -n 3 "$dir/slurmctld.log" "$dir/slurmd.log" "$dir/slurmctld.stdout" "$dir/slurmd.stdout" 2>/dev/null | tr '\n' ' ')"
        # Stop this try's two daemons, keep munged.
        local ctld=${LOCAL_SLURM_PIDS[-2]} d=${LOCAL_SLURM_PIDS[-1]}
        kill "$ctld" "$d" 2>/dev/null
        wait "$ctld" "$d" 2>/dev/null
        unset 'LOCAL_SLURM_PIDS[-1]' 'LOCAL_SLURM_PIDS[-1]'
    done
    return 1
}

local_slurm_stop() {
    local pid i alive
    [ ${#LOCAL_SLURM_PIDS[@]} -gt 0 ] || return 0
    # Jobs first: a job's slurmstepd outlives slurmd, so a job still running when the daemons go
    # would be left behind. Every job may be cancelled: this Slurm runs this test's jobs only.
    if [ -n "$(squeue -h -o %A 2>/dev/null)" ]; then
        scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null
        for i in $(seq 100); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && sinfo -h -o %t 2>/dev/null | grep -qx idle && break
            sleep 0.2
        done
    fi
    for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for i in $(seq 50); do
        alive=0
        for pid in "${LOCAL_SLURM_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${LOCAL_SLURM_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    LOCAL_SLURM_PIDS=()
}

# Body of every dist_train job script. `python -m launch.slurm submit` writes the #SBATCH lines and the DT_*
# variables above it (see launch/sbatch.py). The one file plays two roles:
#   driver: the batch shell under `sbatch` - or `bash job.sbatch` inside `salloc`, or with no allocation at
#           all (then srun allocates one). It finds rank 0's address, starts the tasks with srun, forwards
#           the preemption signal and requeues the job when training stopped to be resumed.
#   task:   `job.sbatch --task`, started by the driver's srun. It runs the trainer: one process per GPU
#           (DT_LAUNCHER=srun), or the deepspeed launcher once per node (DT_LAUNCHER=deepspeed).
# No `set -e`: the driver must outlive a failed srun to report and requeue.
set -uo pipefail

dt_log() {
    printf '[dist_train %s] %s\n' "$(date '+%F %T')" "$*"
}

# Rank 0 runs on the allocation's first node. Its address is the one SLURM itself uses to reach that node
# (NodeAddr, which defaults to the node's name); the port is derived from the job id, so every task agrees on
# it without talking to the others, and a requeued job gets the same one back.
dt_find_master() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    export MASTER_ADDR=${addr:-$first}
    export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
}

dt_task() {
    # The driver found the master when it ran inside an allocation; a driver without one cannot.
    [[ -n ${MASTER_ADDR:-} ]] || dt_find_master
    cd "$DT_WORKDIR" || exit 1
    case $DT_LAUNCHER in
        srun)
            # One task per GPU: the trainer reads its rank from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
            exec "$DT_PYTHON" -u "${DT_TRAIN[@]}"
            ;;
        deepspeed)
            # One task per node: the deepspeed launcher starts this node's processes and sets RANK etc.
            local hostfile=${TMPDIR:-/tmp}/dist_train_hostfile.$SLURM_JOB_ID.$SLURM_NODEID
            scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$DT_PROCS_PER_NODE/" >"$hostfile"
            # SLURM signals every process of the step. The launchers must not die of USR1 (their default
            # action) nor quit on TERM before the trainers below them have saved: they inherit the ignore,
            # the trainers install their own handlers.
            trap '' USR1 TERM
            exec "$DT_PYTHON" -u -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh \
                --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
                "${DT_TRAIN[@]}"
            ;;
        *)
            dt_log "unknown DT_LAUNCHER=$DT_LAUNCHER (expected srun or deepspeed)"
            exit 2
            ;;
    esac
}

srun_pid=""
preempted=0

# `--signal=B:USR1@grace`: the job's time is nearly up, or an admin asked it to make room. srun forwards
# USR1 to every task; the trainers finish their step, save a checkpoint and exit with DT_EXIT_PREEMPTED.
dt_on_usr1() {
    preempted=1
    dt_log "got USR1: asking training to save a checkpoint and stop"
    [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null
}

# `scancel` or `scontrol requeue`: SLURM sends TERM to the trainers itself; keep waiting while they save.
dt_on_term() {
    dt_log "got TERM: waiting for training to save a checkpoint"
}

dt_driver() {
    cd "$DT_WORKDIR" || exit 1
    local -a alloc=()
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        dt_find_master
    else
        alloc=("${DT_ALLOC_ARGS[@]}")
    fi
    dt_log "job ${SLURM_JOB_ID:-(srun allocates)} nodes ${SLURM_JOB_NODELIST:-?}" \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
    trap dt_on_usr1 USR1
    trap dt_on_term TERM
    srun "${alloc[@]}" "${DT_SRUN_ARGS[@]}" bash "$DT_SCRIPT" --task &
    srun_pid=$!
    local rc
    # A trapped signal interrupts `wait`; wait again until srun is really gone.
    while :; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    dt_log "training exited with code $rc"
    # 128+USR1: the signal came while the trainer was still starting, before it could catch it; nothing new
    # to save then, so requeue all the same.
    local killed_by_usr1=$((128 + $(kill -l USR1)))
    if ((preempted && (rc == DT_EXIT_PREEMPTED || rc == killed_by_usr1))) && [[ -n ${SLURM_JOB_ID:-} ]]; then
        dt_log "requeueing job $SLURM_JOB_ID: the next start resumes from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}

if [[ ${1:-} == --task ]]; then
    dt_task
else
    dt_driver
fi

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
            # A save request reaches every process of the step as USR1 (srun forwards the driver's). The
            # launchers inherit this ignore and never replace it, so they neither die of it (USR1's default
            # action) nor act on it; the trainers install their own handler and save. TERM cannot be shielded
            # like this: deepspeed's per-node launcher (launch.py) installs its own TERM handler, which
            # terminates the trainers and SIGKILLs them 30 s later (torchrun's agent does the same). So a save
            # gets the full DT_GRACE_S only when the TERM goes to the batch shell alone (`python -m
            # launch.slurm cancel`, or `scancel --batch --signal=TERM`), which turns it into USR1 below; a
            # plain `scancel` TERMs every process and KILLs after KillWait, whatever anyone here does.
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
cancelled=0
watchdog=""

# Ask the trainers to save and stop: USR1 to srun, which forwards it to every task. A trainer still starting up
# has no handler yet (in deepspeed mode it ignores USR1 until then, in srun mode it dies of it), so the
# request is repeated every few seconds; after DT_GRACE_S the step is killed.
dt_request_stop() {
    [[ -n $srun_pid ]] || return 0
    kill -USR1 "$srun_pid" 2>/dev/null
    [[ -z $watchdog ]] || return 0
    (
        for ((waited = 0; waited < DT_GRACE_S; waited += 5)); do
            sleep 5
            kill -USR1 "$srun_pid" 2>/dev/null || exit 0
        done
        dt_log "training did not stop within ${DT_GRACE_S}s of the request: killing it"
        kill -KILL "$srun_pid" 2>/dev/null
    ) &
    watchdog=$!
}

# `--signal=B:USR1@grace`: the job's time is nearly up, or an admin preempts it. The trainers finish their
# step, save a checkpoint and exit with DT_EXIT_PREEMPTED; the job is then requeued.
dt_on_usr1() {
    preempted=1
    dt_log "got USR1: asking training to save a checkpoint and stop"
    dt_request_stop
}

# TERM to this shell alone (`python -m launch.slurm cancel` sends `scancel --batch --signal=TERM`): the same
# save request, up to DT_GRACE_S, but no requeue; the job is cancelled once training has stopped. (A plain
# `scancel` also lands here, but it TERMs every process and KILLs after KillWait: see dt_task.)
dt_on_term() {
    cancelled=1
    dt_log "got TERM: asking training to save a checkpoint and stop (up to ${DT_GRACE_S}s), then cancelling"
    dt_request_stop
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
    trap dt_on_term TERM INT
    srun "${alloc[@]}" "${DT_SRUN_ARGS[@]}" bash "$DT_SCRIPT" --task &
    srun_pid=$!
    local rc
    # A trapped signal interrupts `wait`; wait again until srun is really gone.
    while :; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    [[ -z $watchdog ]] || kill "$watchdog" 2>/dev/null
    dt_log "training exited with code $rc"
    if ((cancelled)); then
        # Not requeued; `scancel` marks the job CANCELLED, as the user asked (a TERM it sends here is harmless).
        [[ -n ${SLURM_JOB_ID:-} ]] && scancel "$SLURM_JOB_ID"
        exit "$rc"
    fi
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

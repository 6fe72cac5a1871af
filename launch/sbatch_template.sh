# Body of every dist_train job script. `python -m launch.slurm submit` writes the #SBATCH lines and the DT_*
# variables above it (see launch/sbatch.py). The one file plays two roles:
#   driver: the batch shell under `sbatch` - or `bash job.sbatch` inside `salloc`, or with no allocation at
#           all (then srun allocates one). It finds rank 0's address, starts the tasks with srun, turns the
#           time-limit warning (USR1), `launch.slurm cancel` (USR2) and SLURM's own TERM into a save request,
#           and once training has stopped requeues the job (USR1), cancels it (USR2) or leaves it to SLURM.
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
            # gets the full DT_GRACE_S only when the request goes to the batch shell alone (the time-limit USR1,
            # or `python -m launch.slurm cancel`'s USR2), which turns it into USR1 below; SLURM's own TERM
            # (requeue, preemption, a plain `scancel`) reaches every process and KILLs after KillWait, whatever
            # anyone here does.
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
time_up=0      # USR1: the time limit nears; save, then requeue the job
cancel=0       # USR2: `python -m launch.slurm cancel`; save, then cancel the job
slurm_ends=0   # TERM or INT: SLURM (or a user's plain scancel) ends the job; save, and leave the job to SLURM
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

# `--signal=B:USR1@grace`: the job's time is nearly up. The trainers finish their step, save a checkpoint and
# exit with DT_EXIT_PREEMPTED; the job then requeues itself.
dt_on_usr1() {
    time_up=1
    dt_log "got USR1 (time limit near): asking training to save a checkpoint and stop, then requeueing"
    dt_request_stop
}

# `python -m launch.slurm cancel` sends `scancel --batch --signal=USR2`, and nothing else sends USR2: the same
# save request, up to DT_GRACE_S, then the job is cancelled once training has stopped.
dt_on_usr2() {
    cancel=1
    dt_log "got USR2 (launch.slurm cancel): asking training to save a checkpoint and stop" \
        "(up to ${DT_GRACE_S}s), then cancelling the job"
    dt_request_stop
}

# TERM is SLURM's own way to end a job: `scontrol requeue`, preemption (PreemptMode=REQUEUE or CANCEL), a node
# failure, the time limit itself, and a user's plain `scancel` all TERM the batch shell - and the tasks too, up
# to KillWait before SLURM KILLs them. Training saves; what becomes of the job (requeued, cancelled, timed out)
# is SLURM's decision, so this script neither cancels nor requeues it. (INT: Ctrl-C on `bash job.sbatch`.)
dt_on_term() {
    slurm_ends=1
    dt_log "got TERM: SLURM is ending or requeueing the job; asking training to save a checkpoint and stop"
    dt_request_stop
}

# What becomes of the job once training has stopped with code $1.
dt_finish() {
    local rc=$1
    # 128+USR1: the signal came while the trainer was still starting, before it could catch it; nothing new
    # to save then, so requeue all the same.
    local killed_by_usr1=$((128 + $(kill -l USR1)))
    # Both commands below make SLURM TERM this shell: that TERM is our own doing, not news to report.
    trap '' TERM INT
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        exit "$rc"
    elif ((cancel)); then
        # The user asked for it; this also cancels a job that SLURM requeued meanwhile.
        dt_log "cancelling job $SLURM_JOB_ID as launch.slurm cancel asked"
        scancel "$SLURM_JOB_ID"
    elif ((slurm_ends)); then
        dt_log "job $SLURM_JOB_ID is SLURM's to end or requeue (a requeued job resumes from the latest checkpoint)"
    elif ((time_up && (rc == DT_EXIT_PREEMPTED || rc == killed_by_usr1))); then
        dt_log "requeueing job $SLURM_JOB_ID: the next start resumes from the latest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}

dt_driver() {
    # Trapped first: a signal that comes before training starts must not kill this shell (USR1 and USR2 would).
    trap dt_on_usr1 USR1
    trap dt_on_usr2 USR2
    trap dt_on_term TERM INT
    cd "$DT_WORKDIR" || exit 1
    local -a alloc=()
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        dt_find_master
    else
        alloc=("${DT_ALLOC_ARGS[@]}")
    fi
    dt_log "job ${SLURM_JOB_ID:-(srun allocates)} nodes ${SLURM_JOB_NODELIST:-?}" \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
    if ((time_up || cancel || slurm_ends)); then
        dt_log "asked to stop before training started: not starting it"
        dt_finish "$DT_EXIT_PREEMPTED"
    fi
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
    dt_finish "$rc"
}

if [[ ${1:-} == --task ]]; then
    dt_task
else
    dt_driver
fi

#!/usr/bin/env bash
# Train on this machine with the DeepSpeed launcher: N GPUs when CUDA is present, else N CPU processes (gloo).
#   bash launch/run_local.sh N --config configs/tiny.yaml [key=value ...]
# Same as `deepspeed --num_gpus N launch/train.py ...`, with the CPU set-up done for you, on the first N GPUs
# that CUDA_VISIBLE_DEVICES names where it is set. Training options:
#   python launch/train.py --help
# One difference: TERM, INT (Ctrl-C) or USR1 to this script makes training save a checkpoint and exit 75,
# however long the save takes, up to DT_GRACE_S seconds (default 600).
#
# Why not `exec deepspeed`: deepspeed's per-node launcher answers TERM/INT by terminating the trainers and
# SIGKILLing them 30 s later, which loses the save of a large model. So the launchers run in their own session
# (a Ctrl-C or a group kill never reaches them) with USR1 ignored (which they inherit and keep), and this
# script turns a stop signal into USR1 to that session: only the trainers act on it.
set -uo pipefail  # no -e: the script must outlive a failed launcher to pass its exit code on
usage() { sed -n '2,6s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    ''|*[!0-9]*|0*)  # not a whole number, 0 (deepspeed's launcher answered it with a traceback) or 0-padded
        echo "run_local.sh: the first argument is the number of processes, got '${1:-}': give a whole" \
             "number >= 1, e.g. bash launch/run_local.sh 2 --config configs/tiny.yaml (--help for more)" >&2
        exit 2 ;;
esac
nproc=$1; shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
grace=${DT_GRACE_S:-600}
# A free port unless MASTER_PORT says which: a fixed default made a second run on the same machine (a demo
# next to an experiment) die with EADDRINUSE.
port=${MASTER_PORT:-$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    devices=(--num_gpus "$nproc")
else
    # The GPUs CUDA_VISIBLE_DEVICES names, not 0..N-1 (deepspeed's launcher drops it given --num_gpus).
    listed=$("$python" -m launch.devices "$nproc") || exit 2
    mapfile -t devices <<<"$listed"
fi

# A background subshell is not a process-group leader, so setsid starts the session in place: the launcher's
# pid is the session's (and process group's) id.
(
    trap '' USR1
    exec setsid "$python" -m deepspeed.launcher.runner "${devices[@]}" \
        --master_port "$port" launch/train.py "$@"
) &
launcher=$!
watchdog=""

# The request is repeated every few seconds (a trainer still starting up ignores USR1 until its handler is in
# place); after the grace the whole session is killed.
request_stop() {
    echo "[run_local.sh] got $1: asking training to save a checkpoint and stop (up to ${grace}s)" >&2
    kill -USR1 -- -"$launcher" 2>/dev/null
    [[ -z $watchdog ]] || return 0
    (
        for ((waited = 0; waited < grace; waited += 5)); do
            sleep 5
            kill -USR1 -- -"$launcher" 2>/dev/null || exit 0
        done
        echo "[run_local.sh] training did not stop within ${grace}s: killing it" >&2
        kill -KILL -- -"$launcher" 2>/dev/null
    ) &
    watchdog=$!
}
for sig in TERM INT USR1; do
    # shellcheck disable=SC2064
    trap "request_stop $sig" "$sig"
done

# A trapped signal interrupts `wait`; wait again until the launcher is really gone.
while :; do
    wait "$launcher"
    rc=$?
    kill -0 "$launcher" 2>/dev/null || break
done
[[ -z $watchdog ]] || kill "$watchdog" 2>/dev/null
exit "$rc"

#!/usr/bin/env bash
# Train on this machine with the DeepSpeed launcher: N GPUs when CUDA is present, else N CPU processes (gloo).
#   bash launch/run_local.sh N --config configs/tiny.yaml [key=value ...]
# Same as `deepspeed --num_gpus N launch/train.py ...`, with the CPU set-up done for you. Training options:
#   python launch/train.py --help
set -euo pipefail
usage() { sed -n '2,5s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    ''|*[!0-9]*) echo "run_local.sh: the first argument is the number of processes, got '${1:-}'" >&2; usage >&2
                 exit 2 ;;
esac
nproc=$1; shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "${MASTER_PORT:-29517}" \
    launch/train.py "$@"

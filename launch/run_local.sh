#!/usr/bin/env bash
# Train on this machine with the DeepSpeed launcher: N GPUs when CUDA is present, else N CPU processes (gloo).
#   bash launch/run_local.sh N --config configs/tiny.yaml [key=value ...]
# Same as `deepspeed --num_gpus N launch/train.py ...`, with the CPU set-up done for you.
set -euo pipefail
nproc=${1:?usage: run_local.sh NPROC --config X [key=value ...]}; shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "${MASTER_PORT:-29517}" \
    launch/train.py "$@"

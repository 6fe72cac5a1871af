#!/usr/bin/env bash
# Train on this machine with the DeepSpeed launcher: N GPUs when CUDA is present, else N CPU processes (gloo).
#   bash launch/run_local.sh N --config configs/tiny.yaml [key=value ...]
set -euo pipefail
nproc=${1:?usage: run_local.sh NPROC --config X [key=value ...]}; shift
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29517}" launch/train.py "$@"

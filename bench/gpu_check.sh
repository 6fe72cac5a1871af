#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can show, in one command from a clean checkout after `make install`.
#
#   bash bench/gpu_check.sh [RESULTS.jsonl] [--only NAME,NAME] [--dry-run]
#
# Every check appends one JSON line ({"check": NAME, "ok": ..., figures}) to RESULTS (default
# $OUT/gpu_check.jsonl, else runs/gpu_check/gpu_check.jsonl); those lines become the BENCHMARKS.md rows.
# --dry-run prints every command instead of running it, quoted as a shell would run it, for a node of NGPU GPUs
# (default 8; no GPU needed). --only runs the named checks.
# Checks, on 1 GPU and on all of them where there are several:
#   env              torch, DeepSpeed, GPUs
#   nccl-1, nccl-N   bf16 ZeRO-2 training on 1 and N GPUs (NCCL), the same global batch: same losses
#   fp16-zero0/2     fp16 with dynamic loss scaling: the scale is logged, grad_norm is unscaled, scaler
#                    overflows are not counted as divergence, and ZeRO-0's losses are ZeRO-2's
#   kernels          the flash SDPA kernel with grouped-query attention (enable_gqa), bf16, seq 2048; fp32 GQA
#                    on the memory-efficient kernel; train.tf32
#   compile-zero2    train.compile=true (engine.compile()) gives the eager losses
#   zero3-offload    ZeRO-3 with optimizer (DeepSpeedCPUAdam) and parameter offload
#   memory-estimate  tests/test_scaling.py's CUDA test: the memory estimate against max_memory_allocated
#   reshard-resume   a ZeRO-1 checkpoint of 2 CPU processes resumed on 1 GPU (universal load, fused CUDA AdamW)
#   mfu-eager/-compiled  bench/mfu.py on configs/llama-1b.yaml at seq 2048 (MFU against the GPU's bf16 peak)
#   trainer-vs-hf    bench/throughput.py: our trainer against HF Trainer + DeepSpeed on the same model
#   moe              bench/moe.py: top-2-of-8 MoE against the dense model of the same active parameters (expert
#                    parallel over the GPUs where there are several), and the MoE layer's memory at 2k-32k tokens
#   document-mask    data.document_mask on FlexAttention (compiled, block mask): its logits and gradients against
#                    SDPA with the dense mask (fp32, bf16), and a training run on each with the same losses
#   attention-mask   bench/attention_mask.py: masked (flex, dense) against causal (flash) step time at 512-8192
#                    tokens, documents of ~1k tokens
# All of them take about 17 minutes: on a shorter lease run them in two calls with --only.
set -u
cd "$(dirname "$0")/.."

DRY=0
ONLY=""
RESULTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="$2"; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) RESULTS="$1" ;;
    esac
    shift
done
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:-runs/gpu_check}/gpu_check.jsonl}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dist_train/torch_extensions}
if [ "$DRY" = 1 ]; then
    NGPU=${NGPU:-8}
else
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
    if [ "$NGPU" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # the GPUs the checks may use
        NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr , '\n' | grep -c .)
    fi
    if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no GPU (nvidia-smi -L lists none); try --dry-run" >&2; exit 2; fi
    mkdir -p "$(dirname "$RESULTS")"
fi
G="$PY bench/gpu_check.py --results $RESULTS"
# The same global batch on 1 and N GPUs (accumulation makes up the difference), so their losses agree.
TINY_BF16="precision=bf16 deepspeed.zero_stage=2 train.micro_batch_size=8 train.global_batch_size=$((8 * NGPU))"
# llama-1b at seq 2048 on one GPU, no recomputation (37.5 GiB by `scaling memory`): the MFU goal's setting.
LLAMA_1B="--config configs/llama-1b.yaml --nproc 1 --steps 30 --json model.grad_checkpointing=false \
train.micro_batch_size=4 train.global_batch_size=8 wandb.enabled=false"

check() {  # NAME SECONDS COMMAND: run it (or print it), record a failed exit
    local name=$1 limit=$2 cmd=$3
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
    if [ "$DRY" = 1 ]; then echo "$name: timeout $limit bash -c ${cmd@Q}"; return 0; fi
    echo "== $name ($(date +%T))" >&2
    timeout "$limit" bash -c "$cmd"
    local rc=$?
    if [ $rc -ne 0 ]; then $G status "$name" $rc; fi
}

check env 60 "$PY -c 'import json, torch, deepspeed; print(json.dumps({\"torch\": torch.__version__, \
\"deepspeed\": deepspeed.__version__, \"cuda\": torch.version.cuda, \"gpus\": [torch.cuda.get_device_name(i) \
for i in range(torch.cuda.device_count())]}))' | $G record env"
check nccl-1 120 "$G train nccl-1 --nproc 1 $TINY_BF16"
if [ "$DRY" = 1 ] || [ "$NGPU" -gt 1 ]; then
    check nccl-N 120 "$G train nccl-N --nproc $NGPU $TINY_BF16 && $G same-losses nccl-1-vs-N nccl-1 nccl-N"
fi
check fp16-zero0 120 "$G train fp16-zero0 --nproc $NGPU --fp16 precision=fp16 deepspeed.zero_stage=0"
# DeepSpeed 0.19.8 leaves the ZeRO-0 fp16 loss unscaled (dist_train scales it): the two stages must agree.
check fp16-zero2 120 "$G train fp16-zero2 --nproc $NGPU --fp16 precision=fp16 deepspeed.zero_stage=2 && \
$G same-losses fp16-zero0-vs-2 fp16-zero0 fp16-zero2 --rel 0.025"
check kernels 60 "$G kernels kernels"
check compile-zero2 240 "$G train compile-zero2 --nproc 1 $TINY_BF16 train.compile=true && \
$G same-losses compile-vs-eager nccl-1 compile-zero2"
check zero3-offload 240 "$G train zero3-offload --nproc $NGPU precision=bf16 deepspeed.zero_stage=3 \
deepspeed.offload_optimizer=true deepspeed.offload_params=true"
check memory-estimate 240 "$G pytest memory-estimate tests/test_scaling.py -m gpu -k cuda_max_memory"
check reshard-resume 240 "$G cpu-to-gpu-resume reshard-resume"
check mfu-eager 240 "$PY bench/mfu.py $LLAMA_1B | $G record mfu-eager"
check mfu-compiled 360 "$PY bench/mfu.py $LLAMA_1B train.compile=true | $G record mfu-compiled"
check trainer-vs-hf 360 "$PY bench/throughput.py --config configs/llama-1b.yaml --nproc 1 --steps 20 --repeats 1 \
--runs ours/own-model,hf-trainer --json model.n_layers=8 model.grad_checkpointing=false train.micro_batch_size=4 \
train.global_batch_size=4 wandb.enabled=false | $G record trainer-vs-hf"
check moe 300 "$PY bench/moe.py --nproc $NGPU --steps 20 --repeats 1 --json precision=bf16 deepspeed.zero_stage=2 \
model.n_layers=8 model.d_model=1024 model.n_heads=16 model.n_kv_heads=8 model.d_ff=2816 model.seq_len=1024 \
wandb.enabled=false | $G record moe"
check document-mask 420 "$G pytest document-mask tests/test_document_mask.py -m gpu -k cuda_flex && \
$G train doc-mask-flex --nproc 1 $TINY_BF16 data.document_mask=true model.attention=flex && \
$G train doc-mask-dense --nproc 1 $TINY_BF16 data.document_mask=true model.attention=sdpa && \
$G same-losses doc-mask-flex-vs-dense doc-mask-flex doc-mask-dense"
check attention-mask 300 "$PY bench/attention_mask.py --device cuda --dtype bf16 --d-model 1024 --n-heads 16 \
--n-layers 4 --doc-len 1024 --seq 512 2048 8192 --json | $G record attention-mask"
if [ "$DRY" = 0 ]; then
    echo "results: $RESULTS" >&2
    $PY -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; \
print('\n'.join(f\"{x['check']:<18}{'ok' if x.get('ok') else 'FAILED'}\" for x in r))" "$RESULTS"
fi

"""The DeepSpeed config (`ds_config.json`), generated from ours: never hand-kept twice. ZeRO stage, buckets, overlap,
offload, precision (and the gradient-accumulation dtype) and gradient clipping are set here.
"""

from __future__ import annotations

from typing import Any

from dist_train.config.schema import Config, ModelConfig
from dist_train.config.validation import resolve_grad_accum

DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size (elements): ZeRO-3 keeps it (one bucket, allocated
once), ZeRO 1/2 use OVERLAP_BUCKET."""
OVERLAP_BUCKET = 50_000_000
"""Reduce and all-gather bucket (elements) at ZeRO 1/2, where overlap_comm double-buffers the reduce bucket:
100 MB per bf16 bucket is well past the size at which NCCL reaches its bus bandwidth, and small enough that the
first reduce starts early in the backward pass (DeepSpeed's 5e8 would hold 2 GB of buffers in bf16 and start
reducing only after the last 500 M gradients)."""


def reduce_bucket_size(m: ModelConfig, zero_stage: int) -> int:
    """The bucket for this stage, or the model's parameter count when that is smaller: ZeRO 1-3 allocate a whole
    bucket even for a model that would fill a thousandth of it."""
    from dist_train.model.count import count_params  # imports torch: not at config-validation time

    cap = OVERLAP_BUCKET if zero_stage in (1, 2) else DEEPSPEED_REDUCE_BUCKET
    return min(cap, count_params(m).total)


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config generated from ours: never hand-kept twice. `load_universal` makes the engine load
    a universal checkpoint (a resume on another world size, see dist_train.checkpoint.reshard)."""
    t, ds = cfg.train, cfg.deepspeed
    accum = resolve_grad_accum(cfg, world_size)
    bucket = reduce_bucket_size(cfg.model, ds.zero_stage)
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": bucket}
    if ds.zero_stage in (1, 2):
        # Reduce each bucket of gradients while the backward pass computes the next (stage 3 overlaps by
        # default); the all-gather of the updated weights uses buckets of the same size.
        zero.update(overlap_comm=True, contiguous_gradients=True, allgather_bucket_size=bucket)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Gather the full weights into the checkpoint's fp32 master copy only on demand (export does it).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds_config = {
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # immediate_grad_update: BF16_Optimizer (bf16 ZeRO-1, fp32 accumulation) folds each bf16 gradient into
        # its fp32 one as the backward pass produces it and frees it, rather than holding both until the step.
        "bf16": {"enabled": cfg.precision == "bf16", "immediate_grad_update": True},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # We pass a client optimizer (dist_train.train.optim): torch's AdamW, or DeepSpeedCPUAdam when the
        # optimizer is offloaded, so DeepSpeed's check that offload runs its CPU Adam stays on.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16" and ds.zero_stage > 0 and ds.grad_accum_dtype == "fp32":
        # Sum the micro-batches' gradients in fp32, as Megatron and torchtitan do: in bf16 (DeepSpeed's default)
        # each addition keeps 8 bits of mantissa, so the llama-7b preset's 128 micro-batches would lose the
        # small ones. DeepSpeed 0.19 cannot do it at ZeRO-0 (engine._do_optimizer_sanity_check: "unsupported
        # mix"); at ZeRO-1 it switches to its BF16_Optimizer, which keeps an fp32 gradient per parameter.
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config

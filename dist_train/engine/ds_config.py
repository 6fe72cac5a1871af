"""The DeepSpeed config (`ds_config.json`), generated from ours: never hand-kept twice. ZeRO stage, buckets, offload,
precision and gradient clipping are set here.
"""

from __future__ import annotations

from typing import Any

from dist_train.config.schema import Config, ModelConfig
from dist_train.config.validation import resolve_grad_accum

DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size (elements)."""


def reduce_bucket_size(m: ModelConfig) -> int:
    """DeepSpeed's default, or the model's parameter count when that is smaller: ZeRO 1-3 allocate a whole
    bucket (1 GB in bf16) even for a model that would fill a thousandth of it."""
    from dist_train.model.count import count_params  # imports torch: not at config-validation time

    return min(DEEPSPEED_REDUCE_BUCKET, count_params(m).total)


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config generated from ours: never hand-kept twice. `load_universal` makes the engine load
    a universal checkpoint (a resume on another world size, see dist_train.checkpoint.reshard)."""
    t, ds = cfg.train, cfg.deepspeed
    accum = resolve_grad_accum(cfg, world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": reduce_bucket_size(cfg.model)}
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
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # We pass a client torch AdamW (no JIT-compiled op needed); DeepSpeed must accept it under ZeRO
        # and with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config

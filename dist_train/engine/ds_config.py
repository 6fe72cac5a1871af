"""The DeepSpeed config (`ds_config.json`), generated from ours: never hand-kept twice. ZeRO stage, buckets, overlap,
offload, precision (and the gradient-accumulation dtype) and gradient clipping are set here.
"""

from __future__ import annotations

from typing import Any

from dist_train.config.schema import Config, ModelConfig
from dist_train.config.validation import data_parallel_size, resolve_grad_accum

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
        # Counts data-parallel ranks only: the ranks of a tensor- or sequence-parallel group share micro-batches.
        "train_batch_size": t.micro_batch_size * accum * data_parallel_size(cfg, world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # immediate_grad_update: BF16_Optimizer (bf16 ZeRO-1, fp32 accumulation) folds each bf16 gradient into
        # its fp32 one as the backward pass produces it and frees it, rather than holding both until the step.
        "bf16": {"enabled": cfg.precision == "bf16", "immediate_grad_update": True},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": ds.fp16_initial_scale_power,
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
        # And average them over the data-parallel ranks in fp32 (Megatron's grad_reduce_in_fp32, torchtitan's
        # reduce_dtype): under bf16 DeepSpeed casts the fp32 sum to bf16 for the all-reduce by default, which
        # rounds it to 8 bits again. Twice the gradient traffic, which the overlap at ZeRO-2 hides.
        ds_config["communication_data_type"] = "fp32"
    if cfg.parallel.tensor > 1:
        ds_config["tensor_parallel"] = tensor_parallel_section(cfg)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    return ds_config


def tensor_parallel_section(cfg: Config) -> dict[str, Any]:
    """DeepSpeed AutoTP training. Our Transformer's layers are named for its partition rules: q/k/v and the MLP's
    gate/up projections split by output rows (whole heads per rank), o_proj and down_proj by input columns
    (followed by an all-reduce); embeddings, norms and the head stay whole on every rank. The q/k norms
    (model.qk_norm) stay whole too, but each rank applies them to its own heads only, so their gradients are
    summed over the tensor-parallel group (as transformers' plan for Qwen3: replicated_with_grad_allreduce).
    An hf_config model brings its own plan (transformers' base_model_tp_plan, else DeepSpeed's AutoTP parser)."""
    section: dict[str, Any] = {"autotp_size": cfg.parallel.tensor}
    if not cfg.model.hf_config:
        specs = [{"patterns": list(TP_COLUMN_PATTERNS), "partition_type": "column"},
                 {"patterns": list(TP_ROW_PATTERNS), "partition_type": "row"}]
        if cfg.model.qk_norm:
            specs.append({"patterns": [TP_HEAD_NORM_PATTERN], "partition_type": "skip", "grad_allreduce": True})
        section["partition_config"] = {"use_default_specs": False, "layer_specs": specs}
    return section


# AutoTP matches a Linear module by its weight's name and replaces the whole module (bias included).
TP_COLUMN_PATTERNS = (r".*\.attn\.[qkv]_proj\.weight$", r".*\.mlp\.(gate|up)_proj\.weight$")
"""Linear layers split along their output features (weight dim 0, and the bias) by AutoTP."""
TP_ROW_PATTERNS = (r".*\.attn\.o_proj\.weight$", r".*\.mlp\.down_proj\.weight$")
"""Linear layers split along their input features (weight dim 1); the bias stays whole, added after the
all-reduce."""
TP_HEAD_NORM_PATTERN = r".*\.attn\.[qk]_norm\.weight$"
"""The q/k norms' gains: whole on every rank, their gradients summed over the tensor-parallel group."""

"""Checks of a config's values and of how they combine, run at load time: before any process group or DeepSpeed
engine starts. Each error names the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from dist_train.config.schema import Config, ConfigError, ModelConfig, TrainConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_model(m: ModelConfig) -> None:
    if m.hf_config is not None:
        _require(Path(m.hf_config).exists(), f"model.hf_config: {m.hf_config} does not exist")
    for key in ("n_layers", "d_model", "n_heads", "d_ff", "vocab_size", "seq_len"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}); "
             f"e.g. set model.n_heads={_nearest_divisor(m.d_model, m.n_heads)}")
    if m.n_kv_heads is not None:
        _require(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
                 f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}); "
                 f"use a divisor of {m.n_heads} such as {_nearest_divisor(m.n_heads, m.n_kv_heads)}")
    if m.pos == "rope":
        _require(m.head_dim % 2 == 0, f"model.pos=rope needs an even head dimension, got "
                                      f"d_model/n_heads = {m.head_dim}")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.layerscale_init is not None:
        _require(m.layerscale_init > 0, f"model.layerscale_init must be positive or null, got "
                                        f"{m.layerscale_init}")


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - near))


def _validate_train(t: TrainConfig) -> None:
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every"):
        _require(getattr(t, key) > 0, f"train.{key} must be positive, got {getattr(t, key)}")
    _require(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be between 0 and train.lr ({t.lr})")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(0 < t.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 turns it off), got {t.grad_clip}")
    _require(t.eval_every >= 0 and t.eval_steps > 0, "train.eval_every must be >= 0 and train.eval_steps > 0")
    _require(t.max_bad_steps > 0, f"train.max_bad_steps must be positive, got {t.max_bad_steps}")
    if t.global_batch_size is not None:
        _require(t.global_batch_size > 0 and t.global_batch_size % t.micro_batch_size == 0,
                 f"train.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
                 f"train.micro_batch_size ({t.micro_batch_size})")


def validate(cfg: Config) -> None:
    """Checks that need only the config; raise ConfigError naming the key and the fix."""
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    ds = cfg.deepspeed
    _require(0 <= ds.zero_stage <= 3, f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
    _require(not ds.offload_optimizer or ds.zero_stage >= 1,
             "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    _require(not ds.offload_params or ds.zero_stage == 3, "deepspeed.offload_params needs deepspeed.zero_stage=3")
    d = cfg.data
    _require(bool(d.path) or bool(d.sources),
             "data.path is missing: set data.path=<shard folder> (made by `python -m data_prep.shard`) "
             "or data.sources=[{path, weight}, ...]")
    _require(not (d.path and d.sources), "set either data.path or data.sources, not both")
    for i, s in enumerate(d.sources or []):
        _require(s.weight > 0, f"data.sources[{i}].weight must be positive, got {s.weight}")
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _require(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep_last >= 0,
             "checkpoint.every and checkpoint.keep_last must be >= 0")


def resolve_grad_accum(cfg: Config, world_size: int) -> int:
    """Micro-batches per step on this world size; checks that global_batch_size divides."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_pass = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_pass == 0,
             f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
             f"({t.micro_batch_size}) x world size ({world_size}) = {per_pass}; pick a multiple of {per_pass}")
    return t.global_batch_size // per_pass

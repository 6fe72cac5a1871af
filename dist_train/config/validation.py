"""Checks of a config's values and of how they combine, run at load time: before any process group or DeepSpeed
engine starts. Each error names the key and the fix.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.config.quote import quote
from dist_train.config.schema import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take; `describe()` is what its docstring and its error say."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """Exclude `low` itself."""
    high_open: bool = False
    """Exclude `high` itself."""
    text: str | None = None
    """Wording of the range when the interval notation reads badly (e.g. `0, 1, 2 or 3`)."""

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # nan compares false to everything; inf is no learning rate, weight or ratio
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


def _number(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)

RANGES: dict[str, Range] = {
    "model.n_layers": POSITIVE, "model.d_model": POSITIVE, "model.n_heads": POSITIVE,
    "model.n_kv_heads": POSITIVE, "model.d_ff": POSITIVE, "model.vocab_size": POSITIVE,
    "model.seq_len": POSITIVE, "model.dropout": FRACTION, "model.layerscale_init": POSITIVE,
    "model.norm_eps": POSITIVE, "model.rope_theta": POSITIVE, "model.init_std": POSITIVE,
    "data.sources.weight": POSITIVE, "data.num_workers": NON_NEGATIVE,
    "data.noise_density": Range(0, 1, low_open=True, high_open=True), "data.mean_noise_span_length": Range(1),
    "train.max_steps": POSITIVE, "train.micro_batch_size": POSITIVE, "train.grad_accum_steps": POSITIVE,
    "train.global_batch_size": POSITIVE, "train.lr": POSITIVE, "train.min_lr": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE, "train.decay_fraction": Range(0, 1, low_open=True),
    "train.weight_decay": NON_NEGATIVE, "train.beta1": FRACTION, "train.beta2": FRACTION, "train.eps": POSITIVE,
    "train.grad_clip": NON_NEGATIVE, "train.seed": Range(0, 2**32 - 1), "train.eval_every": NON_NEGATIVE,
    "train.eval_steps": POSITIVE, "train.log_every": POSITIVE, "train.max_bad_steps": POSITIVE,
    "train.max_rollbacks": NON_NEGATIVE, "train.spike_window": POSITIVE, "train.spike_margin": POSITIVE,
    "train.spike_steps": POSITIVE, "train.z_loss": NON_NEGATIVE,
    "deepspeed.zero_stage": Range(0, 3, text="0, 1, 2 or 3"),
    "deepspeed.fp16_initial_scale_power": Range(0, 40),
    "parallel.tensor": POSITIVE, "parallel.sequence": POSITIVE, "parallel.expert": POSITIVE,
    "model.moe.num_experts": NON_NEGATIVE, "model.moe.top_k": POSITIVE, "model.moe.every": POSITIVE,
    "model.moe.capacity_factor": NON_NEGATIVE, "model.moe.aux_loss_coef": NON_NEGATIVE,
    "model.moe.z_loss_coef": NON_NEGATIVE, "model.moe.shared_experts": NON_NEGATIVE,
    "checkpoint.every": NON_NEGATIVE, "checkpoint.keep_last": NON_NEGATIVE,
    "eval.every": POSITIVE, "eval.limit": POSITIVE, "eval.num_fewshot": NON_NEGATIVE, "eval.batch_size": POSITIVE,
}
"""Every numeric config field (dotted key; `data.sources.weight` is each source's weight) and its range. A
field set to None (where the schema allows it) means "off" or "derived" and is not checked."""


def _require(ok: bool, message: str, *keys: str) -> None:
    if not ok:
        raise ConfigError(message, keys)


def _lookup(cfg: Config, dotted: str) -> list[tuple[str, Any]]:
    """(key as the user writes it, value) for a dotted key; one pair per source for `data.sources.*`."""
    if dotted.startswith("data.sources."):
        field_name = dotted.rsplit(".", 1)[1]
        return [(f"data.sources[{i}].{field_name}", getattr(s, field_name))
                for i, s in enumerate(cfg.data.sources or [])]
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return [(dotted, node)]


def check_ranges(cfg: Config) -> None:
    """Every numeric field inside its range (RANGES); the error names the key, the range and the value."""
    for dotted, allowed in RANGES.items():
        for key, value in _lookup(cfg, dotted):
            if value is not None:
                _require(allowed.contains(value), f"{key} must be {allowed.describe()}, got {quote(value)}", key)


def _validate_model(m: ModelConfig) -> None:
    if m.hf_config is not None:
        _require(Path(m.hf_config).exists(), f"model.hf_config: {m.hf_config} does not exist", "model.hf_config")
    # The suggestions are searched for only when a check fails: the search is the one costly part of a check.
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads}); "
                          f"e.g. set model.n_heads={_nearest_divisor(m.d_model, m.n_heads)}", ("model.d_model",
                                                                                               "model.n_heads"))
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}); "
                          f"use a divisor of {m.n_heads} such as {_nearest_divisor(m.n_heads, m.n_kv_heads)}",
                          ("model.n_heads", "model.n_kv_heads"))
    _require(not (m.qk_norm and m.hf_config), "model.qk_norm with model.hf_config: the transformers config decides "
             "its attention (Qwen3's and OLMo 2's have their own q/k norms); remove model.qk_norm", "model.qk_norm",
             "model.hf_config")
    if m.pos == "relative":
        _require(m.arch == "encoder_decoder", "model.pos=relative (T5's relative attention bias) is built for "
                 "model.arch=encoder_decoder only; use pos=rope or pos=learned", "model.pos")
    if m.pos == "rope":
        _require(m.head_dim % 2 == 0, f"model.pos=rope needs an even head dimension, got "
                                      f"d_model/n_heads = {m.head_dim}", "model.pos", "model.d_model",
                 "model.n_heads")


DIVISOR_SEARCH = 100_000
"""Trial divisions a suggestion may cost (a few ms); a config's sizes are far below its square (10^10)."""


def _nearest_divisor(n: int, near: int) -> int:
    """The divisor of `n` closest to `near` (the smaller on a tie), from the divisor pairs (d, n // d) with d up
    to DIVISOR_SEARCH: exact for n below DIVISOR_SEARCH², a divisor still (if maybe not the closest) above."""
    divisors = [x for d in range(1, min(math.isqrt(n), DIVISOR_SEARCH) + 1) if n % d == 0 for x in (d, n // d)]
    return min(divisors, key=lambda d: (abs(d - near), d))


def _validate_train(t: TrainConfig) -> None:
    _require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be between 0 and train.lr ({t.lr})",
             "train.min_lr", "train.lr")
    if t.global_batch_size is not None:
        _require(t.global_batch_size % t.micro_batch_size == 0,
                 f"train.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
                 f"train.micro_batch_size ({t.micro_batch_size})", "train.global_batch_size",
                 "train.micro_batch_size")


def check_parallel_heads(p: ParallelConfig, n_heads: int, n_kv_heads: int, where: str) -> None:
    """Tensor parallelism splits the heads over its ranks, and Ulysses trades a sequence slice for a share of
    the heads: both need whole (query and key/value) heads per rank. `where` names the keys."""
    for key, size in (("parallel.tensor", p.tensor), ("parallel.sequence", p.sequence)):
        for what, heads in (("attention heads", n_heads), ("key/value heads", n_kv_heads)):
            _require(heads % size == 0,
                     f"{key}={size} does not divide the model's {heads} {what} ({where}); every rank needs whole "
                     f"heads: set {key} to a divisor of {math.gcd(n_heads, n_kv_heads)}", key)


def _validate_parallel(cfg: Config) -> None:
    p, m = cfg.parallel, cfg.model
    _require(p.tensor == 1 or p.sequence == 1,
             f"parallel.tensor={p.tensor} with parallel.sequence={p.sequence}: DeepSpeed 0.19's AutoTP engine "
             f"replaces the sequence-parallel groups with its own, so the two cannot be combined; use one of "
             f"them (parallel.tensor=1 or parallel.sequence=1)", "parallel.tensor", "parallel.sequence")
    _require(m.arch == "decoder" or (p.tensor == 1 and p.sequence == 1),
             f"model.arch=encoder_decoder with parallel.tensor={p.tensor}, parallel.sequence={p.sequence}: tensor "
             f"and sequence parallelism are built for the decoder-only model; use ZeRO-3 for a large "
             f"encoder-decoder (parallel.tensor=1 parallel.sequence=1)", "parallel.tensor", "parallel.sequence")
    if m.hf_config is None:  # an hf_config model's heads are checked with its config (train.preflight)
        check_parallel_heads(p, m.n_heads, m.kv_heads, "model.n_heads, model.n_kv_heads")
    _require(m.seq_len % p.sequence == 0,
             f"model.seq_len ({m.seq_len}) is not divisible by parallel.sequence ({p.sequence}): each rank holds "
             f"an equal slice of the sequence; set model.seq_len to a multiple of {p.sequence}", "model.seq_len",
             "parallel.sequence")
    # DeepSpeed 0.19.8 itself starts AutoTP with ZeRO-3 (its docs still say stages 0-2), but a ZeRO-3 checkpoint
    # then holds ZeRO partitions of TP shards, which neither resume on another layout nor export here can read.
    _require(p.tensor == 1 or cfg.deepspeed.zero_stage <= 2,
             f"parallel.tensor={p.tensor} needs deepspeed.zero_stage 0, 1 or 2 (AutoTP training's supported "
             f"stages; its ZeRO-3 checkpoints cannot be exported or re-sharded); set deepspeed.zero_stage=2, "
             f"which shards gradients and optimizer states over the data-parallel ranks", "parallel.tensor",
             "deepspeed.zero_stage")


def _validate_moe(cfg: Config) -> None:
    """Mixture-of-Experts through DeepSpeed's MoE layer, in our own decoder, at ZeRO 0-2, data and expert
    parallel only (what DeepSpeed 0.19.8's native MoE runs)."""
    moe, p = cfg.model.moe, cfg.parallel
    if not moe.enabled:
        _require(p.expert == 1, f"parallel.expert={p.expert} needs a Mixture-of-Experts model: set "
                 f"model.moe.num_experts (e.g. 8), or parallel.expert=1", "parallel.expert")
        return
    keys = ("model.moe.num_experts",)
    _require(moe.num_experts >= 2, "model.moe.num_experts=1: a router over one expert is a dense MLP; use 0 "
             "(dense) or at least 2 experts", *keys)
    _require(moe.top_k <= moe.num_experts, f"model.moe.top_k ({moe.top_k}) is more than model.moe.num_experts "
             f"({moe.num_experts}): each token goes to top_k distinct experts", "model.moe.top_k", *keys)
    _require(moe.every <= cfg.model.n_layers, f"model.moe.every ({moe.every}) is more than model.n_layers "
             f"({cfg.model.n_layers}): no block would get an MoE MLP", "model.moe.every")
    _require(cfg.model.hf_config is None, "model.moe with model.hf_config: a transformers MoE architecture "
             "(Mixtral, Qwen3-MoE) brings its own router from its config; remove model.moe", "model.moe.num_experts",
             "model.hf_config")
    _require(cfg.model.arch == "decoder", "model.moe is built for the decoder-only model (model.arch=decoder)",
             "model.moe.num_experts", "model.arch")
    _require(moe.num_experts % p.expert == 0, f"parallel.expert ({p.expert}) does not divide "
             f"model.moe.num_experts ({moe.num_experts}): each expert-parallel rank holds num_experts / "
             f"parallel.expert whole experts", "parallel.expert", *keys)
    _require(p.tensor == 1 and p.sequence == 1, f"model.moe with parallel.tensor={p.tensor}, parallel.sequence="
             f"{p.sequence}: dist_train runs DeepSpeed's MoE with data and expert parallelism only; shard the "
             f"experts with parallel.expert and the rest with deepspeed.zero_stage 1 or 2", "parallel.tensor",
             "parallel.sequence")
    _require(cfg.deepspeed.zero_stage <= 2, "model.moe with deepspeed.zero_stage=3: DeepSpeed's native MoE is not "
             "supported with ZeRO-3 (it asserts); use deepspeed.zero_stage=2 (gradients and optimizer states "
             "sharded) or 1, and spread the experts with parallel.expert", "deepspeed.zero_stage", *keys)


FLEX_MIN_HEAD_DIM = 16
"""torch's compiled FlexAttention refuses heads narrower than this on CUDA ("NYI: embedding dimension ... must be
at least 16"): model.attention=flex is refused below it, and `auto` keeps the dense mask there."""


def _validate_document_mask(cfg: Config) -> None:
    m = cfg.model
    if m.attention == "flex":
        _require(cfg.data.document_mask, "model.attention=flex runs the document mask (data.document_mask=true); "
                 "the plain causal mask is fastest on SDPA's flash kernel: use model.attention=auto or sdpa",
                 "model.attention", "data.document_mask")
        _require(m.dropout == 0.0, "model.attention=flex with model.dropout > 0: FlexAttention has no attention "
                 "dropout; set model.dropout=0 or model.attention=auto (SDPA with a boolean mask)", "model.attention",
                 "model.dropout")
        _require(m.head_dim >= FLEX_MIN_HEAD_DIM, f"model.attention=flex with heads of {m.head_dim} (model.d_model "
                 f"/ model.n_heads): torch's compiled FlexAttention needs {FLEX_MIN_HEAD_DIM} or more; use fewer heads "
                 f"or model.attention=auto (SDPA with a boolean mask)", "model.attention", "model.n_heads")
    if not cfg.data.document_mask:
        return
    _require(m.arch == "decoder", "data.document_mask with model.arch=encoder_decoder: span corruption turns each "
             "window into one encoder input and one target, with no packed documents to mask apart; remove "
             "data.document_mask", "data.document_mask", "model.arch")
    _require(m.hf_config is None, "data.document_mask with model.hf_config: the mask is built into dist_train's own "
             "decoder; train a transformers architecture without it (remove data.document_mask) or use our "
             "decoder's keys (model.n_layers, model.d_model, ...)", "data.document_mask", "model.hf_config")


def _validate_eval(cfg: Config) -> None:
    if not cfg.eval.tasks:
        return
    _require(cfg.model.arch == "decoder", "eval.tasks serves decoder-only models to lm-eval; for an encoder-decoder "
             "remove eval.tasks, export the run and run `lm_eval --model hf --model_args pretrained=EXPORT,"
             "backend=seq2seq`", "eval.tasks", "model.arch")
    _require(importlib.util.find_spec("lm_eval") is not None, "eval.tasks needs EleutherAI's lm-evaluation-harness: "
             "pip install 'dist-train[eval]' (or remove eval.tasks)", "eval.tasks")
    every = cfg.checkpoint.every
    _require(every > 0, "eval.tasks evaluates published checkpoints: set checkpoint.every (e.g. 1000)",
             "eval.tasks", "checkpoint.every")
    _require(cfg.eval.every is None or cfg.eval.every % every == 0,
             f"eval.every ({cfg.eval.every}) must be a multiple of checkpoint.every ({every}): the published "
             f"checkpoint is what is evaluated; set eval.every={every * max(1, round((cfg.eval.every or 0) / every))}",
             "eval.every", "checkpoint.every")
    if cfg.eval.include_path is not None:
        _require(Path(cfg.eval.include_path).is_dir(), f"eval.include_path: {cfg.eval.include_path} is not a folder "
                 f"(configs/eval holds the offline tasks shipped with dist_train)", "eval.include_path")


def validate(cfg: Config) -> None:
    """Checks that need only the config; raise ConfigError naming the key and the fix."""
    check_ranges(cfg)
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    _validate_parallel(cfg)
    _validate_moe(cfg)
    _validate_document_mask(cfg)
    _validate_eval(cfg)
    ds = cfg.deepspeed
    _require(not ds.offload_optimizer or ds.zero_stage >= 1,
             "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1", "deepspeed.offload_optimizer",
             "deepspeed.zero_stage")
    _require(not ds.offload_params or ds.zero_stage == 3, "deepspeed.offload_params needs deepspeed.zero_stage=3",
             "deepspeed.offload_params", "deepspeed.zero_stage")
    d = cfg.data
    _require(bool(d.path) or bool(d.sources),
             "data.path is missing: set data.path=<shard folder> (made by `python -m data_prep.shard`) "
             "or data.sources=[{path, weight}, ...]", "data.path", "data.sources")
    _require(not (d.path and d.sources), "set either data.path or data.sources, not both", "data.path",
             "data.sources")
    total_weight = sum(s.weight for s in d.sources or [])
    _require(math.isfinite(total_weight),
             "data.sources weights add up to more than the largest float (the sum is inf): they are relative "
             "shares, so scale them all down (e.g. 1e308 and 1e308 -> 1 and 1)", "data.sources")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Data-parallel ranks: world size / (parallel.tensor x parallel.sequence), which must come out whole."""
    p = cfg.parallel
    model_ranks = p.tensor * p.sequence
    _require(world_size % model_ranks == 0,
             f"the world size ({world_size} processes) is not divisible by parallel.tensor ({p.tensor}) x "
             f"parallel.sequence ({p.sequence}) = {model_ranks}; launch a multiple of {model_ranks} processes or "
             f"change parallel.tensor / parallel.sequence", "parallel.tensor", "parallel.sequence")
    dp = world_size // model_ranks
    _require(dp % p.expert == 0,
             f"parallel.expert ({p.expert}) does not divide the data-parallel size ({dp} of {world_size} processes): "
             f"experts are spread over groups of parallel.expert data-parallel ranks; launch a multiple of "
             f"{p.expert * model_ranks} processes or set parallel.expert to a divisor of {dp}", "parallel.expert")
    return dp


def resolve_grad_accum(cfg: Config, world_size: int) -> int:
    """Micro-batches per step on this world size; checks that global_batch_size divides. A micro-batch is shared
    by a tensor- or sequence-parallel group, so the global batch counts data-parallel ranks only."""
    t = cfg.train
    dp = data_parallel_size(cfg, world_size)
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_pass = t.micro_batch_size * dp
    _require(t.global_batch_size % per_pass == 0,
             f"train.global_batch_size ({t.global_batch_size}) is not divisible by train.micro_batch_size "
             f"({t.micro_batch_size}) x data-parallel size ({dp}) = {per_pass}; pick a multiple of {per_pass}",
             "train.global_batch_size")
    return t.global_batch_size // per_pass

"""The one typed config of a run: dataclasses loaded from YAML, overridden by dotted `key=value` pairs,
validated before any process group or DeepSpeed engine starts.

Everything else (the DeepSpeed config, the model, the optimizer, the loader) is derived from it, so a user
never keeps two configs in sync (GPT-NeoX's rule). Each field carries a one-line docstring.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users write it as a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


class ConfigError(ValueError):
    """A config the user must fix: the message names the key and what to do."""


@dataclass
class ModelConfig:
    n_layers: int = 4
    """Number of Transformer blocks."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention (query) heads; d_model must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head attention)."""
    d_ff: int = 512
    """Hidden width of the MLP (for swiglu: the width of each of the gate and up projections)."""
    vocab_size: int = 2048
    """Rows of the embedding table; must be >= the tokenizer's vocabulary."""
    seq_len: int = 128
    """Tokens per training sequence (and the number of learned positions)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer."""
    pos: Literal["rope", "learned"] = "rope"
    """Position encoding: rotary (Llama) or a learned table (GPT-2)."""
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    """MLP kind: gated SiLU (Llama) or GELU (GPT-2)."""
    bias: bool = False
    """Biases in linear layers and norms."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    dropout: float = 0.0
    """Dropout on attention weights, residual branches and embeddings."""
    layerscale_init: float | None = None
    """Initial value of per-channel LayerScale on each residual branch; None turns LayerScale off."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    attention: Literal["auto", "sdpa", "matmul"] = "auto"
    """Attention kernel: `sdpa` (torch's scaled_dot_product_attention: the flash kernel on GPU), `matmul` (two
    batched matmuls and an fp32 softmax: faster than torch's CPU flash kernel in bf16 for short sequences, but
    seq_len^2 memory), `auto` (matmul for bf16/fp16 on the CPU up to 128 tokens, else sdpa). Same math."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections are scaled by 1/sqrt(2*n_layers)."""
    hf_config: str | None = None
    """Path to a `transformers` config (folder or config.json): train that architecture instead (built with
    `AutoModelForCausalLM.from_config`, no download). The shape fields above are then ignored."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SourceConfig:
    path: str
    """A shard folder made by `python -m data_prep.shard` (holds manifest.json)."""
    weight: float = 1.0
    """Relative share of training samples drawn from this source."""


@dataclass
class DataConfig:
    path: str | None = None
    """One shard folder (holds manifest.json). Use either this or `sources`."""
    sources: list[SourceConfig] | None = None
    """Several shard folders mixed by weight: [{path, weight}, ...]."""
    num_workers: int = 0
    """Read training batches ahead in a background thread, 2 per worker (0 reads them in the training loop)."""

    def weighted_paths(self) -> list[tuple[str, float]]:
        if self.sources:
            return [(s.path, s.weight) for s in self.sources]
        return [(self.path, 1.0)] if self.path else []


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per process per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all processes; when set, grad_accum_steps is derived from it and
    must come out whole (global = micro_batch_size * grad_accum_steps * world_size)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine to min_lr, warmup-stable-decay, or constant lr."""
    decay_fraction: float = 0.2
    """For the wsd schedule: the final fraction of steps that decays linearly to min_lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    seed: int = 1234
    """Seed of the model init and the data order."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (0 turns it off) and at the end."""
    eval_steps: int = 10
    """Validation micro-batches per evaluation."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    compile: bool = False
    """torch.compile the model (fuses element-wise ops and the loss; the first step pays the compilation)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss (each one is skipped, not applied)."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the optimizer step) on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (ZeRO 3 only)."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a checkpoint every this many steps (0: only at the end and on a signal)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (0 keeps all)."""


@dataclass
class RunConfig:
    out_dir: str = "runs/tiny"
    """Run folder: config, metrics, checkpoints, summary. Re-running into it resumes."""
    name: str | None = None
    """Human-readable run name (default: the run folder's name)."""


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (rank 0 only)."""
    project: str = "dist_train"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None uses the default of the API key."""
    name: str | None = None
    """W&B run name; default: run.name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes locally (upload later with `wandb sync`), online needs an API key."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Mixed-precision mode: bf16, fp16 (CUDA only, dynamic loss scaling) or fp32."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_hash(self) -> str:
        """Hash of what a checkpoint's tensors depend on: a resume with another hash is refused."""
        shape = {k: v for k, v in dataclasses.asdict(self.model).items() if k in SHAPE_KEYS}
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


# Model fields that change tensor shapes or the parameter set: changing one breaks a resume.
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "norm", "pos", "mlp",
              "bias", "tie_embeddings", "layerscale_init", "hf_config")


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed dataclasses, with errors that name the key.

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {key}")


def _unknown_key_error(prefix: str, name: str, valid: list[str]) -> ConfigError:
    full = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(valid)})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown_key_error(prefix, str(name), names)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}: missing required key '{missing[0]}'")
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one dotted `key=value` override in place; the value is parsed as YAML (`4`, `true`, `[a, b]`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.max_steps=100)")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    node[parts[-1]] = parse_yaml(raw) if raw.strip() else None


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    for override in overrides:
        apply_override(tree, override)
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"{_error_source(str(e), path, overrides)}{e}") from None


def _error_source(message: str, path: Path | None, overrides: list[str] | tuple[str, ...]) -> str:
    """Where the offending key was written: the command-line override that set it (the last one wins), else
    the YAML file. A message about one key starts with it, or quotes it."""
    for override in reversed(overrides):
        key = override.split("=", 1)[0].strip()
        if message.startswith(f"{key}:") or f"'{key}'" in message:
            return f"override {override}: "
    return f"{path}: " if path is not None else ""


# ----------------------------------------------------------------------------------------------------------
# Validation that needs nothing but the config itself. Checks against the data and the machine are in
# dist_train.preflight (they read manifests and look for CUDA).

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


DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size (elements)."""


def reduce_bucket_size(m: ModelConfig) -> int:
    """DeepSpeed's default, or the model's parameter count when that is smaller: ZeRO 1-3 allocate a whole
    bucket (1 GB in bf16) even for a model that would fill a thousandth of it."""
    from dist_train.scaling_count import count_params  # imports torch: not at config-validation time

    return min(DEEPSPEED_REDUCE_BUCKET, count_params(m).total)


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config generated from ours: never hand-kept twice. `load_universal` makes the engine load
    a universal checkpoint (a resume on another world size, see dist_train.reshard)."""
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

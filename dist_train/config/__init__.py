"""The one typed run config: dataclasses with a docstring per field (schema), YAML + dotted overrides (loading)
and the checks that refuse a bad value before any process starts (validation).

Not here: the DeepSpeed config generated from it (`dist_train.engine.ds_config`), checks that need the data or
the machine (`dist_train.train.preflight`).
"""

from dist_train.config.loading import (
    add_override_arguments,
    apply_override,
    config_from_dict,
    load_config,
    overrides_from,
    parse_args_with_overrides,
    parse_yaml,
)
from dist_train.config.schema import (
    SHAPE_KEYS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
    WandbConfig,
)
from dist_train.config.validation import data_parallel_size, resolve_grad_accum, validate

__all__ = ["SHAPE_KEYS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "EvalConfig",
           "ModelConfig", "ParallelConfig", "RunConfig", "SourceConfig", "TrainConfig", "WandbConfig",
           "add_override_arguments", "apply_override", "config_from_dict", "data_parallel_size", "load_config",
           "overrides_from", "parse_args_with_overrides", "parse_yaml", "resolve_grad_accum", "validate"]

"""Checks of a config against the data and the machine, run before any process group starts.

`dist_train.config.validate` checks the config on its own; these need the shard manifests, the tokenizer's
vocabulary and the presence of CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dist_train.config import Config, ConfigError, resolve_grad_accum
from dist_train.formats.manifest import read_manifest


def check_data(cfg: Config) -> list[dict[str, Any]]:
    """Every data source exists, fits the model's vocabulary, and holds at least one sequence."""
    manifests = []
    for path, _ in cfg.data.weighted_paths():
        key = "data.path" if cfg.data.path else "data.sources"
        if not Path(path).is_dir():
            raise ConfigError(f"{key}: {path} does not exist; make it with `python -m data_prep.shard "
                              f"--input ... --tokenizer ... --out {path}`")
        try:
            manifest = read_manifest(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        model_vocab, key = model_vocab_size(cfg)
        if manifest["vocab_size"] > model_vocab:
            raise ConfigError(
                f"{key} ({model_vocab}) is smaller than the tokenizer's vocabulary "
                f"({manifest['vocab_size']}, from {path}/manifest.json); set {key}="
                f"{_round_up(manifest['vocab_size'], 64)} (rounded up to a multiple of 64)")
        for split in ("train", "val"):
            tokens = manifest["splits"].get(split, {}).get("num_tokens", 0)
            if split == "val" and tokens == 0 and cfg.train.eval_every == 0:
                continue
            if tokens < cfg.model.seq_len + 1:
                raise ConfigError(
                    f"model.seq_len ({cfg.model.seq_len}) is longer than the {split} split of {path} "
                    f"({tokens} tokens); lower model.seq_len or add data")
        manifests.append(manifest)
    return manifests


def model_vocab_size(cfg: Config) -> tuple[int, str]:
    """Rows of the embedding table and the key that sets them (an `hf_config` model brings its own)."""
    if cfg.model.hf_config is None:
        return cfg.model.vocab_size, "model.vocab_size"
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model.hf_config).vocab_size, f"vocab_size in {cfg.model.hf_config}"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_machine(cfg: Config) -> None:
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling does not run on "
                          "the CPU); use precision=bf16 or precision=fp32 here")


def check_positions(cfg: Config) -> None:
    """An `hf_config` model has a fixed number of positions; ours has seq_len learned ones or RoPE."""
    if cfg.model.hf_config is None:
        return
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(cfg.model.hf_config)
    limit = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    if limit is not None and cfg.model.seq_len > limit:
        raise ConfigError(f"model.seq_len ({cfg.model.seq_len}) is longer than the model's positions "
                          f"({limit}, max_position_embeddings in {cfg.model.hf_config}); lower model.seq_len")


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be refused before launch, refused with the key and the fix."""
    check_machine(cfg)
    check_positions(cfg)
    resolve_grad_accum(cfg, world_size)
    check_data(cfg)

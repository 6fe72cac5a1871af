"""`build_model`: the model a config names, ours or a transformers one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dist_train.config import Config, ModelConfig
from dist_train.model.decoder import Transformer
from dist_train.model.encoder_decoder import EncoderDecoder
from dist_train.model.hf import HFCausalLM, HFSeq2SeqLM, load_hf_config


def build_model(cfg: ModelConfig, zero3_config: dict[str, Any] | None = None,
                expert_parallel: tuple[int, int] = (1, 0)) -> nn.Module:
    """Our Transformer, or the HF architecture named by cfg.hf_config. `zero3_config` (a ZeRO-3 DeepSpeed
    config) makes transformers build an HF model partitioned; our Transformer is partitioned by building it
    inside `deepspeed.zero.Init` (see trainer.build_partitioned_model). `expert_parallel`: (size, rank) of an MoE
    model's expert-parallel group; (1, 0), all experts here, outside training."""
    if cfg.hf_config:
        return HFCausalLM(cfg, zero3_config) if cfg.arch == "decoder" else HFSeq2SeqLM(cfg, zero3_config)
    return Transformer(cfg, expert_parallel) if cfg.arch == "decoder" else EncoderDecoder(cfg)


def model_vocab_size(cfg: Config) -> tuple[int, str]:
    """Rows of the embedding table and the key that sets them (an `hf_config` model brings its own)."""
    if cfg.model.hf_config is None:
        return cfg.model.vocab_size, "model.vocab_size"

    return load_hf_config(cfg.model.hf_config).vocab_size, f"vocab_size in {cfg.model.hf_config}"

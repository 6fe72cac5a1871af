"""Building the model for the engine: under ZeRO-3 no rank ever holds the whole model.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.config import Config
from dist_train.formats.manifest import read_manifest
from dist_train.model import document_mask, z_loss
from dist_train.model.build import build_model


def build_partitioned_model(cfg: Config, ds_config: dict[str, Any], deepspeed: Any, rank: int = 0) -> torch.nn.Module:
    """The model, with the z-loss of train.z_loss and the document mask of data.document_mask; at ZeRO-3 each
    module's weights are partitioned as soon as it is built, so no rank ever holds the whole model (a 7B model
    would otherwise take 27 GB of host memory per process). Our Transformer is built inside zero.Init and
    initialises its weights through gathered_for_init; transformers does both itself for an hf_config model when
    given the config. `rank`: this process's, which places its experts."""
    if cfg.deepspeed.zero_stage != 3:
        # DeepSpeed's expert-parallel groups are consecutive data-parallel ranks (MoE runs without TP and SP).
        model = build_model(cfg.model, expert_parallel=(cfg.parallel.expert, rank % cfg.parallel.expert))
    elif cfg.model.hf_config:
        model = build_model(cfg.model, zero3_config=ds_config)
    else:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(cfg.model)
    z_loss.enable(model, cfg.train.z_loss)
    document_mask.enable(model, documents_eos(cfg))
    return model


def documents_eos(cfg: Config) -> int | None:
    """The EOS id that ends each document of the data (its manifest's; the loader refuses sources that differ)
    when data.document_mask is on, else None."""
    if not cfg.data.document_mask:
        return None
    return read_manifest(cfg.data.weighted_paths()[0][0])["eos_token_id"]

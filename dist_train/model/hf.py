"""A transformers causal LM (`model.hf_config`) behind the same interface as our Transformer: `model(ids, labels)`
returns the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_train.config import ModelConfig
from dist_train.model.loss import lm_loss


class HFCausalLM(nn.Module):
    """Any `transformers` causal LM behind our forward signature (labels already shifted, see module doc).

    Given a ZeRO-3 DeepSpeed config, transformers builds the model under `deepspeed.zero.Init` and initialises
    each module through its gathered partitions: no rank ever holds the whole model."""

    def __init__(self, cfg: ModelConfig, zero3_config: dict[str, Any] | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            hf_cfg = AutoConfig.from_pretrained(cfg.hf_config)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.hf_config: cannot read a transformers config from {cfg.hf_config}: {e}; "
                             f"pass a folder holding config.json or the path of a config.json") from e
        # transformers looks for a live HfDeepSpeedConfig through a global weak reference; alive only while this
        # model is built, or every later from_config (the meta-device FLOP count) would be partitioned too.
        zero3_marker = None
        if zero3_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            zero3_marker = HfDeepSpeedConfig(zero3_config)
        self.model = AutoModelForCausalLM.from_config(hf_cfg)
        self.sequence_parallel: Any = None
        """Set by `model.sequence_parallel.enable_hf`: this rank holds one slice of each sequence."""
        del zero3_marker
        if cfg.grad_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (a deprecated alias until v6).
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.sequence_parallel is None:
            logits = self.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
            return logits if labels is None else lm_loss(logits, labels)
        # This rank's slice of each sequence: positions are global (ALST all-gathers them for the mask).
        T = input_ids.shape[1]
        start = self.sequence_parallel.start(T)
        positions = torch.arange(start, start + T, device=input_ids.device).expand(input_ids.shape[0], T)
        logits = self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits  # (B, T, V)
        return logits if labels is None else self.sequence_parallel.loss(logits, labels)

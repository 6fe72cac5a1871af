"""A transformers model (`model.hf_config`) behind the same interface as ours: a causal LM as `model(ids, labels)`
(like `Transformer`), a seq2seq LM (T5, BART; model.arch=encoder_decoder) as `model(encoder_ids, decoder_ids,
labels)` (like `EncoderDecoder`); both return the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.config import ConfigError, ModelConfig
from dist_train.formats.custom_code import custom_code_classes
from dist_train.model.hf_router import HFRouterWindow, router_aux_loss_coef
from dist_train.model.z_loss import ZLoss, model_loss


def load_hf_config(path: str) -> Any:
    """The transformers config that `model.hf_config` names, never with remote code: `trust_remote_code` is
    always False (left unset, transformers would ask on a terminal), so a config whose `auto_map` needs Python
    files of its own is refused rather than run on every rank."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        auto_map = custom_code_classes(file)
        if auto_map:
            raise ConfigError(f"model.hf_config: {file} names custom code ({auto_map}), which dist_train never "
                              f"runs (trust_remote_code is off): use a model_type built into transformers, or "
                              f"register the class in your own code") from None
        raise ValueError(f"model.hf_config: cannot read a transformers config from {path}: {e}; pass a folder "
                         f"holding config.json or the path of a config.json") from e


def _read_config(cfg: ModelConfig) -> Any:
    return load_hf_config(cfg.hf_config)


def _build(auto_class: Any, hf_cfg: Any, cfg: ModelConfig, zero3_config: dict[str, Any] | None) -> nn.Module:
    """`auto_class.from_config`, partitioned under a ZeRO-3 config, with gradient checkpointing if asked."""
    # transformers looks for a live HfDeepSpeedConfig through a global weak reference; alive only while this
    # model is built, or every later from_config (the meta-device FLOP count) would be partitioned too.
    zero3_marker = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        zero3_marker = HfDeepSpeedConfig(zero3_config)
    model = auto_class.from_config(hf_cfg, trust_remote_code=False)
    del zero3_marker
    if cfg.grad_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (a deprecated alias until v6).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


class HFCausalLM(nn.Module):
    """Any `transformers` causal LM behind our forward signature (labels already shifted, see module doc).

    Given a ZeRO-3 DeepSpeed config, transformers builds the model under `deepspeed.zero.Init` and initialises
    each module through its gathered partitions: no rank ever holds the whole model. An MoE model (Mixtral,
    Qwen-MoE, ...) trains with its routers' load-balancing loss (`auxiliary_loss`) and logs it (`router_window`),
    as our MoE Transformer does."""

    def __init__(self, cfg: ModelConfig, zero3_config: dict[str, Any] | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        hf_cfg = _read_config(cfg)
        self.model = _build(AutoModelForCausalLM, hf_cfg, cfg, zero3_config)
        self.sequence_parallel: Any = None
        """Set by `model.sequence_parallel.enable_hf`: this rank holds one slice of each sequence."""
        self.aux_loss_coef = router_aux_loss_coef(hf_cfg)
        """MoE: the weight of the routers' load-balancing loss (None: a dense model)."""
        self.router_window = HFRouterWindow(hf_cfg.num_experts_per_tok) if self.aux_loss_coef is not None else None
        self._aux_loss: torch.Tensor | None = None  # of the last forward, when it was a training one
        self.z_loss: ZLoss | None = None
        """Set by `model.z_loss.enable` (train.z_loss > 0)."""

    def auxiliary_loss(self) -> torch.Tensor | None:
        """MoE: the weighted load-balancing loss of the last forward, added to the loss for the backward (None for
        a dense model, or after an eval or no-grad forward)."""
        return None if self._aux_loss is None else self.aux_loss_coef * self._aux_loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._aux_loss = None
        kwargs: dict[str, Any] = {}
        routed = self.router_window is not None and self.training and torch.is_grad_enabled()
        if self.router_window is not None:  # explicit: a config may turn it on for every forward
            kwargs["output_router_logits"] = routed
        if self.sequence_parallel is not None:
            # This rank's slice of each sequence: positions are global (ALST all-gathers them for the mask).
            T = input_ids.shape[1]
            start = self.sequence_parallel.start(T)
            kwargs["position_ids"] = torch.arange(start, start + T, device=input_ids.device).expand(
                input_ids.shape[0], T)
        out = self.model(input_ids=input_ids, use_cache=False, **kwargs)
        if routed:
            self._keep_aux_loss(out)
        logits = out.logits  # (B, T, V)
        return logits if labels is None else model_loss(self, logits, labels)

    def _keep_aux_loss(self, out: Any) -> None:
        if not isinstance(out.aux_loss, torch.Tensor):  # transformers returns 0 when it recorded no router logits
            raise RuntimeError(f"model.hf_config: {type(self.model).__name__} returned no router logits with "
                               f"output_router_logits=True, so its load-balancing loss cannot be trained; use a "
                               f"transformers version that records them for this architecture")
        self.router_window.add(out.aux_loss, out.router_logits)
        # Under sequence parallelism each rank's loss is over its slice of the tokens and DeepSpeed sums the
        # gradients of the group's ranks: 1/P of each keeps the mean of the slices' losses.
        slices = 1 if self.sequence_parallel is None else self.sequence_parallel.size
        self._aux_loss = out.aux_loss / slices


class HFSeq2SeqLM(nn.Module):
    """Any `transformers` seq2seq LM (T5, BART, ...) behind `EncoderDecoder`'s forward signature: the decoder
    input is given (the span-corruption loader shifts the labels itself), so the model's own shift is unused."""

    def __init__(self, cfg: ModelConfig, zero3_config: dict[str, Any] | None = None):
        super().__init__()
        from transformers import AutoModelForSeq2SeqLM

        hf_cfg = _read_config(cfg)
        if not getattr(hf_cfg, "is_encoder_decoder", False):
            raise ValueError(f"model.hf_config: {cfg.hf_config} is not an encoder-decoder config; use "
                             f"model.arch=decoder for a causal LM")
        self.model = _build(AutoModelForSeq2SeqLM, hf_cfg, cfg, zero3_config)
        self.z_loss: ZLoss | None = None
        """Set by `model.z_loss.enable` (train.z_loss > 0)."""

    def forward(self, encoder_ids: torch.Tensor, decoder_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=encoder_ids, decoder_input_ids=decoder_ids, use_cache=False).logits
        return logits if labels is None else model_loss(self, logits, labels)  # logits (B, Td, V)

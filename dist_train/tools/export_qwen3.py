"""Export of a decoder with q/k norms (model.qk_norm) as `Qwen3ForCausalLM`.

Qwen3 is Llama's decoder (RMSNorm, RoPE, SwiGLU, pre-norm) whose attention RMSNorms each head's query and key over
head_dim, after the projections and before RoPE, with one gain for all query heads and one for all key heads, as
ours does; its q/k norms take `rms_norm_eps` like the other norms. Its MLP has no biases, so model.bias=true (which
our MLP would have) is refused, as is any other layout; LayerScale gains are folded into o_proj and down_proj as for
Llama. The other tensors are Llama's (`dist_train.tools.export.llama_tensors`), plus `self_attn.q_norm.weight` and
`self_attn.k_norm.weight` per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dist_train.checkpoint.weights import Weights
from dist_train.config import ModelConfig
from dist_train.tools.llama_family import LLAMA_LAYOUT, llama_family_kwargs, refuse_if_any


def check_qwen3(m: ModelConfig) -> None:
    """Refuse `m` (a model with model.qk_norm) with the reasons it cannot be exported as Qwen3."""
    kind = (m.norm, m.pos, m.mlp)
    reasons = [
        (kind != LLAMA_LAYOUT, f"model.norm/pos/mlp = {'/'.join(kind)} (Qwen3 is {'/'.join(LLAMA_LAYOUT)})"),
        (m.bias, "model.bias=true (Qwen3's MLP has no biases, only its attention may)"),
        (m.norm_position != "pre", "model.norm_position=post (Qwen3 is pre-norm)"),
    ]
    refuse_if_any(reasons, "model.qk_norm=true exports as Qwen3ForCausalLM (the transformers class with per-head "
                  "q/k norms), which does not compute this model",
                  "It needs rmsnorm/rope/swiglu, pre-norm and model.bias=false; a model with another layout and q/k "
                  "norms has no transformers class without custom code")


def qwen3_config(m: ModelConfig, eos_token_id: int | None) -> Any:
    from transformers import Qwen3Config

    cfg = Qwen3Config(**llama_family_kwargs(m, eos_token_id), attention_bias=False, use_sliding_window=False)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def qk_norm_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """The q/k norms' gains under Qwen3's names (the rest of a Qwen3 is named as Llama)."""
    for i in range(w.config.model.n_layers):
        for x in "qk":
            yield f"model.layers.{i}.self_attn.{x}_norm.weight", w.get(f"blocks.{i}.attn.{x}_norm.weight")

"""Exact parameter counts and training FLOPs from a `ModelConfig`, without building the model.

The count mirrors `dist_train.model` term by term (a test checks it against `sum(p.numel())` of built
models for every option combination). FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):
6·N for the matmuls of the forward and backward pass plus 12·n_layers·d_model·seq_len for attention
scores and their weighted sum, where N is every parameter except the input embedding tables (a lookup
costs no FLOPs; the output head, tied or not, is a real matmul and counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_train.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Distinct parameters (a tied head shares the embedding's tensor): what `sum(p.numel())` gives."""
    embedding: int
    """Input embedding tables: token and learned position embeddings."""
    non_embedding: int
    """total - embedding (a tied head is part of the embedding, as in Kaplan et al. 2020)."""
    flops_params: int
    """N of the 6·N FLOPs: every parameter used in a matmul per token, i.e. all but the input embedding
    tables, with the output head counted even when it is tied to the token embedding."""


def _norm_params(cfg: ModelConfig) -> int:
    if cfg.norm == "rmsnorm":
        return cfg.d_model
    return cfg.d_model * (2 if cfg.bias else 1)


def _block_params(cfg: ModelConfig) -> int:
    d, kv_dim, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.d_ff
    attn = 2 * d * d + 2 * d * kv_dim + (2 * d + 2 * kv_dim if cfg.bias else 0)  # q, o + k, v
    if cfg.mlp == "swiglu":
        mlp = 3 * d * f + (2 * f + d if cfg.bias else 0)  # gate, up, down
    else:
        mlp = 2 * d * f + (f + d if cfg.bias else 0)  # up, down
    layerscale = 2 * d if cfg.layerscale_init is not None else 0
    return attn + mlp + 2 * _norm_params(cfg) + layerscale


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact count from the config alone (for `hf_config` models: built on the meta device, no memory)."""
    if cfg.hf_config:
        return _count_hf(cfg)
    token_emb = cfg.vocab_size * cfg.d_model
    embedding = token_emb + (cfg.seq_len * cfg.d_model if cfg.pos == "learned" else 0)
    head = 0 if cfg.tie_embeddings else token_emb
    total = embedding + cfg.n_layers * _block_params(cfg) + _norm_params(cfg) + head
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      flops_params=total - embedding + (token_emb if cfg.tie_embeddings else 0))


def _hf_model_on_meta(cfg: ModelConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.hf_config))


def _count_hf(cfg: ModelConfig) -> ParamCount:
    model = _hf_model_on_meta(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      flops_params=total - embedding + (head.weight.numel() if tied else 0))


def attention_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(n_layers, d_model) of the architecture that will actually be trained."""
    if cfg.hf_config:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.hf_config)
        return hf.num_hidden_layers, hf.hidden_size
    return cfg.n_layers, cfg.d_model


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward): 6·N + 12·n_layers·d_model·seq_len (PaLM, app. B)."""
    n_layers, d_model = attention_shape(cfg)
    return 6 * count_params(cfg).flops_params + 12 * n_layers * d_model * cfg.seq_len


def run_flops(cfg: ModelConfig, tokens: int) -> int:
    """Training FLOPs of a whole run of `tokens` tokens."""
    return flops_per_token(cfg) * tokens

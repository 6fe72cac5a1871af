"""Exact parameter counts and training FLOPs from a `ModelConfig`, without building the model.

The count mirrors `dist_train.model` term by term (a test checks it against `sum(p.numel())` of built
models for every option combination). FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):
6·N for the matmuls of the forward and backward pass plus 12·n_layers·d_model·seq_len for attention
scores and their weighted sum, where N is every parameter except the input embedding tables (a lookup
costs no FLOPs; the output head, tied or not, is a real matmul and counts).

Encoder-decoders (model.arch=encoder_decoder) are counted per example of Le encoder and Ld decoder tokens (the
span-corruption lengths, `dist_train.data.span_corruption`): 6 x (encoder parameters x Le + decoder parameters x
Ld + cross-attention key/value projections x Le + head x Ld) + 12·n_layers·d_model·(Le² + Ld² + Ld·Le) for the
scores of the encoder's, the decoder's and the cross attention; "per token" divides by seq_len, the training
tokens the trainer counts per example.

Mixture-of-Experts decoders (model.moe) hold num_experts expert MLPs, a bias-free router (d_model x num_experts)
and the shared experts' MLP in each MoE block, but a token passes through only top_k of the experts: N of the
6·N is the *active* parameters (all but the num_experts - top_k experts a token skips in each MoE layer, router
included), the convention of Switch, Mixtral and DeepSeekMoE for FLOPs and MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_train.config import ModelConfig
from dist_train.model.hf import load_hf_config
from dist_train.model.blocks import RelativePositionBias


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Distinct parameters (a tied head shares the embedding's tensor): what `sum(p.numel())` gives."""
    embedding: int
    """Input embedding tables: token and learned position embeddings."""
    non_embedding: int
    """total - embedding (a tied head is part of the embedding, as in Kaplan et al. 2020)."""
    flops_params: int
    """N of the 6·N FLOPs: every parameter used in a matmul per token, i.e. all active parameters but the input
    embedding tables, with the output head counted even when it is tied to the token embedding."""
    active: int
    """Parameters one token uses: total less the num_experts - top_k routed experts it skips in each MoE layer
    (the router and shared experts are used by every token); equals total for a dense model, and for an
    hf_config model, whose own routing (a transformers MoE architecture) is not read."""


def _norm_params(cfg: ModelConfig) -> int:
    if cfg.norm == "rmsnorm":
        return cfg.d_model
    return cfg.d_model * (2 if cfg.bias else 1)


def _attention_params(cfg: ModelConfig) -> int:
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    qk_norms = 2 * cfg.head_dim if cfg.qk_norm else 0  # one RMSNorm gain over head_dim for q, one for k
    return 2 * d * d + 2 * d * kv_dim + (2 * d + 2 * kv_dim if cfg.bias else 0) + qk_norms  # q, o + k, v


def _cross_kv_params(cfg: ModelConfig) -> int:
    """The k and v projections of a cross-attention: they run over the encoder's tokens."""
    kv_dim = cfg.kv_heads * cfg.head_dim
    return 2 * cfg.d_model * kv_dim + (2 * kv_dim if cfg.bias else 0)


def _cross_params(cfg: ModelConfig) -> int:
    """What a decoder block of an encoder-decoder adds: cross-attention, its norm and LayerScale."""
    layerscale = cfg.d_model if cfg.layerscale_init is not None else 0
    return _attention_params(cfg) + _norm_params(cfg) + layerscale


def _mlp_params(cfg: ModelConfig, d_ff: int) -> int:
    d, f = cfg.d_model, d_ff
    if cfg.mlp in ("swiglu", "geglu"):
        return 3 * d * f + (2 * f + d if cfg.bias else 0)  # gate, up, down
    return 2 * d * f + (f + d if cfg.bias else 0)  # up, down


def _block_params(cfg: ModelConfig, moe: bool = False) -> int:
    """A block with the dense MLP, or (`moe`) with model.moe's experts, router and shared experts."""
    d = cfg.d_model
    if moe:
        e = cfg.moe
        mlp = (e.num_experts * _mlp_params(cfg, cfg.d_ff) + d * e.num_experts  # experts, router (no bias)
               + (_mlp_params(cfg, cfg.d_ff * e.shared_experts) if e.shared_experts else 0))
    else:
        mlp = _mlp_params(cfg, cfg.d_ff)
    layerscale = 2 * d if cfg.layerscale_init is not None else 0
    return _attention_params(cfg) + mlp + 2 * _norm_params(cfg) + layerscale


def moe_layers(cfg: ModelConfig) -> int:
    """Blocks with an MoE MLP: every model.moe.every-th (blocks every-1, 2·every-1, ...); 0 for a dense model."""
    return cfg.n_layers // cfg.moe.every if cfg.moe.enabled else 0


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact count from the config alone (for `hf_config` models: built on the meta device, no memory)."""
    if cfg.hf_config:
        return _count_hf(cfg)
    if cfg.arch == "encoder_decoder":
        return _count_encoder_decoder(cfg)
    token_emb = cfg.vocab_size * cfg.d_model
    embedding = token_emb + (cfg.seq_len * cfg.d_model if cfg.pos == "learned" else 0)
    head = 0 if cfg.tie_embeddings else token_emb
    n_moe = moe_layers(cfg)
    blocks = (cfg.n_layers - n_moe) * _block_params(cfg) + n_moe * _block_params(cfg, moe=True)
    total = embedding + blocks + _norm_params(cfg) + head
    skipped = n_moe * (cfg.moe.num_experts - cfg.moe.top_k) * _mlp_params(cfg, cfg.d_ff)  # experts a token skips
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      flops_params=total - skipped - embedding + (token_emb if cfg.tie_embeddings else 0),
                      active=total - skipped)


def _count_encoder_decoder(cfg: ModelConfig) -> ParamCount:
    token_emb = cfg.vocab_size * cfg.d_model
    embedding = token_emb + (2 * cfg.seq_len * cfg.d_model if cfg.pos == "learned" else 0)  # one table per stack
    relative = 2 * RelativePositionBias.NUM_BUCKETS * cfg.n_heads if cfg.pos == "relative" else 0  # a lookup
    head = 0 if cfg.tie_embeddings else token_emb
    blocks = cfg.n_layers * (2 * _block_params(cfg) + _cross_params(cfg))
    total = embedding + relative + blocks + 2 * _norm_params(cfg) + head
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      flops_params=total - embedding - relative + (token_emb if cfg.tie_embeddings else 0),
                      active=total)


def _hf_model_on_meta(cfg: ModelConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if cfg.arch == "decoder" else AutoModelForSeq2SeqLM
    with torch.device("meta"):
        return auto.from_config(load_hf_config(cfg.hf_config), trust_remote_code=False)


def _count_hf(cfg: ModelConfig) -> ParamCount:
    model = _hf_model_on_meta(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding,
                      flops_params=total - embedding + (head.weight.numel() if tied else 0), active=total)


def attention_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(n_layers, d_model) of the architecture that will actually be trained."""
    if cfg.hf_config:

        hf = load_hf_config(cfg.hf_config)
        return hf.num_hidden_layers, hf.hidden_size
    return cfg.n_layers, cfg.d_model


def flops_per_token(cfg: ModelConfig, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """Training FLOPs per token (forward + backward): 6·N + 12·n_layers·d_model·seq_len (PaLM, app. B); for an
    encoder-decoder per example over seq_len (module doc), the span lengths from the data.* corruption settings."""
    n_layers, d_model = attention_shape(cfg)
    if cfg.arch == "decoder":
        return 6 * count_params(cfg).flops_params + 12 * n_layers * d_model * cfg.seq_len
    from dist_train.data.span_corruption import span_lengths

    lengths = span_lengths(cfg.seq_len, noise_density, mean_noise_span_length)
    le, ld = lengths.encoder, lengths.decoder
    encoder, decoder_on_le, decoder_on_ld = _seq2seq_flops_params(cfg)
    per_example = (6 * (encoder * le + decoder_on_le * le + decoder_on_ld * ld)
                   + 12 * n_layers * d_model * (le * le + ld * ld + ld * le))
    return round(per_example / cfg.seq_len)


def _seq2seq_flops_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """Matmul parameters applied per encoder token, per encoder token in the decoder (cross-attention keys and
    values), and per decoder token (with the head)."""
    if cfg.hf_config:
        model = _hf_model_on_meta(cfg)
        lookups = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        encoder_ids = {id(p) for p in model.get_encoder().parameters()}
        encoder = sum(p.numel() for p in model.get_encoder().parameters() if id(p) not in lookups)
        rest = sum(p.numel() for p in model.parameters() if id(p) not in encoder_ids and id(p) not in lookups)
        return encoder, 0, rest + model.get_output_embeddings().weight.numel() * (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    encoder = cfg.n_layers * _block_params(cfg) + _norm_params(cfg)
    cross_kv = cfg.n_layers * _cross_kv_params(cfg)
    decoder = count_params(cfg).flops_params - encoder - cross_kv
    return encoder, cross_kv, decoder


def run_flops(cfg: ModelConfig, tokens: int) -> int:
    """Training FLOPs of a whole run of `tokens` tokens."""
    return flops_per_token(cfg) * tokens

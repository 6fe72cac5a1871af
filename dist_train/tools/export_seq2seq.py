"""Encoder-decoder exports (model.arch=encoder_decoder): our tensors as T5 v1.1 or BART ones.

T5 (`T5ForConditionalGeneration`): pre-norm, rmsnorm, pos=relative, no bias, tied head (transformers 5 always
ties T5's lm_head to `shared`; tie_word_embeddings=false in its config only turns off the d_model^-0.5 output
scale of the original T5, which we do not apply). T5 attention has no 1/sqrt(head_dim): q's rows carry it.
BART (`BartForConditionalGeneration`): post-norm ("Add & Norm"), layernorm (eps 1e-5, fixed in BART),
pos=learned (BART's tables have 2 leading rows it never reads for our positions: zeros), gelu (tanh,
"gelu_new"), biases (zeros where we have none), `final_logits_bias` zeros.
Both: grouped key/value heads are repeated to every query head, LayerScale gains folded into the rows of the
projection they scale, the decoder starts from the EOS id (`dist_train.data.span_corruption`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dist_train.checkpoint.weights import Weights
from dist_train.config import ConfigError, ModelConfig

T5_MLP = {"geglu": "gated-gelu", "swiglu": "gated-silu", "gelu": "gelu_new"}


def seq2seq_family(m: ModelConfig) -> str:
    """`t5` or `bart`; refuse a layout neither class computes, naming what to change."""
    if m.qk_norm:
        raise ConfigError("model.qk_norm=true: neither T5's nor BART's attention has q/k norms, so this "
                          "encoder-decoder has no transformers class without custom code; train it without "
                          "model.qk_norm to export it")
    if (m.norm_position, m.norm, m.pos) == ("pre", "rmsnorm", "relative") and not m.bias and m.tie_embeddings:
        return "t5"
    if (m.norm_position, m.norm, m.pos, m.mlp) == ("post", "layernorm", "learned", "gelu") and m.norm_eps == 1e-5:
        return "bart"
    raise ConfigError(
        "this encoder-decoder layout has no transformers class without custom code: export needs T5 v1.1's "
        "(norm_position=pre, norm=rmsnorm, pos=relative, bias=false, tie_embeddings=true) or BART's "
        "(norm_position=post, norm=layernorm, pos=learned, mlp=gelu, norm_eps=1e-5)")


def seq2seq_config(m: ModelConfig, eos_token_id: int | None) -> Any:
    from transformers import BartConfig, T5Config

    ids = {"pad_token_id": eos_token_id, "eos_token_id": eos_token_id, "decoder_start_token_id": eos_token_id}
    if seq2seq_family(m) == "t5":
        cfg = T5Config(vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.head_dim, d_ff=m.d_ff,
                       num_layers=m.n_layers, num_decoder_layers=m.n_layers, num_heads=m.n_heads,
                       dropout_rate=m.dropout, layer_norm_epsilon=m.norm_eps, feed_forward_proj=T5_MLP[m.mlp],
                       tie_word_embeddings=False, **ids)
        cfg.architectures = ["T5ForConditionalGeneration"]
        return cfg
    cfg = BartConfig(vocab_size=m.vocab_size, d_model=m.d_model, encoder_layers=m.n_layers,
                     decoder_layers=m.n_layers, encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
                     encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function="gelu_new",
                     dropout=m.dropout, attention_dropout=m.dropout, activation_dropout=0.0,
                     max_position_embeddings=m.seq_len, scale_embedding=False, tie_word_embeddings=m.tie_embeddings,
                     bos_token_id=eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None,
                     init_std=m.init_std, **ids)
    cfg.architectures = ["BartForConditionalGeneration"]
    return cfg


def _all_heads(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Repeat each key/value head (rows of a k/v weight or bias) for the n_heads/n_kv_heads query heads it serves."""
    rep = m.n_heads // m.kv_heads
    return t.view(m.kv_heads, m.head_dim, *t.shape[1:]).repeat_interleave(rep, 0).reshape(m.d_model, *t.shape[1:])


def _linear(w: Weights, name: str, gain: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one of our Linear layers, a missing bias as zeros, a LayerScale gain folded in."""
    weight = w.get(f"{name}.weight")
    bias = w.get(f"{name}.bias") if w.config.model.bias else torch.zeros(weight.shape[0])
    if gain is not None:
        gamma = w.get(gain)
        weight, bias = gamma[:, None] * weight, gamma * bias
    return weight, bias


def _attention(w: Weights, ours: str, gain: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """q, k, v, o of one attention layer with all heads (multi-head attention, as T5 and BART have)."""
    m = w.config.model
    q, k, v = (_linear(w, f"{ours}.{x}_proj") for x in "qkv")
    k, v = ((_all_heads(t[0], m), _all_heads(t[1], m)) for t in (k, v))
    return {"q": q, "k": k, "v": v, "o": _linear(w, f"{ours}.o_proj", gain)}


def _sublayers(w: Weights, p: str, is_decoder: bool) -> list[tuple[str, str, str]]:
    """(our attention, its norm, its LayerScale gain or "") of each attention sub-layer of block prefix p."""
    gains = w.config.model.layerscale_init is not None
    out = [("attn", "attn_norm", p + "attn_scale.gamma" if gains else "")]
    if is_decoder:
        out.append(("cross_attn", "cross_norm", p + "cross_scale.gamma" if gains else ""))
    return out


def t5_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    m = w.config.model
    gains = m.layerscale_init is not None
    yield "shared.weight", w.get("tok_emb.weight")
    for stack in ("encoder", "decoder"):
        is_decoder = stack == "decoder"
        yield f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", w.get(f"{stack}.rel_bias.weight")
        for i in range(m.n_layers):
            p, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            for j, (ours, norm, gain) in enumerate(_sublayers(w, p, is_decoder)):
                theirs = f"{h}{j}.{'EncDecAttention' if ours == 'cross_attn' else 'SelfAttention'}."
                yield f"{h}{j}.layer_norm.weight", w.get(p + norm + ".weight")
                layers = _attention(w, p + ours, gain or None)
                yield theirs + "q.weight", layers["q"][0] * m.head_dim**-0.5  # T5 does not scale the scores
                for x in "kvo":
                    yield theirs + f"{x}.weight", layers[x][0]
            ff = f"{h}{2 if is_decoder else 1}."
            yield ff + "layer_norm.weight", w.get(p + "mlp_norm.weight")
            down = _linear(w, p + "mlp.down_proj", p + "mlp_scale.gamma" if gains else None)[0]
            if m.mlp == "gelu":
                yield ff + "DenseReluDense.wi.weight", w.get(p + "mlp.up_proj.weight")
            else:
                yield ff + "DenseReluDense.wi_0.weight", w.get(p + "mlp.gate_proj.weight")
                yield ff + "DenseReluDense.wi_1.weight", w.get(p + "mlp.up_proj.weight")
            yield ff + "DenseReluDense.wo.weight", down
        yield f"{stack}.final_layer_norm.weight", w.get(f"{stack}.norm.weight")


def _bart_norm(w: Weights, ours: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = w.get(f"{ours}.weight")
    return weight, (w.get(f"{ours}.bias") if w.config.model.bias else torch.zeros_like(weight))


def bart_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    m = w.config.model
    gains = m.layerscale_init is not None
    yield "model.shared.weight", w.get("tok_emb.weight")
    for stack in ("encoder", "decoder"):
        is_decoder, pre = stack == "decoder", f"model.{stack}."
        # transformers 5 ties BART's embed_tokens to `shared` only when the head is tied too: write them.
        yield pre + "embed_tokens.weight", w.get("tok_emb.weight").clone()
        positions = w.get(f"{stack}.pos_emb.weight")
        yield pre + "embed_positions.weight", torch.cat([torch.zeros(2, m.d_model), positions])
        tensors = {"layernorm_embedding": _bart_norm(w, f"{stack}.norm")}
        for i in range(m.n_layers):
            p, h = f"{stack}.blocks.{i}.", f"layers.{i}."
            for ours, norm, gain in _sublayers(w, p, is_decoder):
                theirs = h + ("encoder_attn" if ours == "cross_attn" else "self_attn")
                tensors[theirs + "_layer_norm"] = _bart_norm(w, p + norm)
                for x, t in _attention(w, p + ours, gain or None).items():
                    tensors[f"{theirs}.{'out' if x == 'o' else x}_proj"] = t
            tensors[h + "fc1"] = _linear(w, p + "mlp.up_proj")
            tensors[h + "fc2"] = _linear(w, p + "mlp.down_proj", p + "mlp_scale.gamma" if gains else None)
            tensors[h + "final_layer_norm"] = _bart_norm(w, p + "mlp_norm")
        for name, (weight, bias) in tensors.items():
            yield f"{pre}{name}.weight", weight
            yield f"{pre}{name}.bias", bias
    if not m.tie_embeddings:
        yield "lm_head.weight", w.get("lm_head.weight")
    yield "final_logits_bias", torch.zeros(1, m.vocab_size)

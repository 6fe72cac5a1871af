"""Export of a Mixture-of-Experts decoder (model.moe) as `MixtralForCausalLM`.

Mixtral computes what our MoE model computes when the layout matches: Llama's blocks (RMSNorm, RoPE, SwiGLU, no
biases) with an MoE MLP in every block, top-k routing with k >= 2 renormalised over the chosen experts (DeepSpeed's
top-2 and top-k gates), dropless, and no shared experts. Anything else has no Mixtral equivalent and is refused
with the reason. Mixtral keeps its experts as two stacked tensors per layer: `gate_up_proj` (E, 2 x d_ff, d_model),
the gate's rows first, and `down_proj` (E, d_model, d_ff).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dist_train.checkpoint.weights import Weights
from dist_train.config import ModelConfig
from dist_train.tools.llama_family import LLAMA_LAYOUT, llama_family_kwargs, refuse_if_any


def check_mixtral(m: ModelConfig) -> None:
    """Refuse `m` (an MoE model) with the reasons it cannot be exported as Mixtral."""
    moe = m.moe
    kind = (m.norm, m.pos, m.mlp)
    reasons = [
        (kind != LLAMA_LAYOUT, f"model.norm/pos/mlp = {'/'.join(kind)} (Mixtral is {'/'.join(LLAMA_LAYOUT)})"),
        (m.bias, "model.bias=true (Mixtral's projections have no biases)"),
        (m.norm_position != "pre", "model.norm_position=post (Mixtral is pre-norm)"),
        (m.qk_norm, "model.qk_norm=true (Mixtral's attention has no q/k norms)"),
        (moe.every != 1, f"model.moe.every={moe.every} (Mixtral has an MoE MLP in every block)"),
        (moe.capacity_factor > 0, f"model.moe.capacity_factor={moe.capacity_factor} (Mixtral is dropless: a "
                                  f"dropped token would be computed there)"),
        (moe.shared_experts > 0, f"model.moe.shared_experts={moe.shared_experts} (Mixtral has no shared experts; "
                                 f"Qwen2-MoE's shared expert is gated, ours is not)"),
        (moe.top_k == 1, "model.moe.top_k=1 (DeepSpeed's top-1 gate weights the expert by its router probability, "
                         "Mixtral renormalises it to 1)"),
    ]
    refuse_if_any(reasons, "this Mixture-of-Experts model has no transformers class without custom code",
                  "MixtralForCausalLM needs rmsnorm/rope/swiglu, no biases, an MoE MLP in every block "
                  "(model.moe.every=1), dropless routing (capacity_factor=0), top_k >= 2, no shared experts and no "
                  "q/k norms")


def mixtral_config(m: ModelConfig, eos_token_id: int | None) -> Any:
    from transformers import MixtralConfig

    cfg = MixtralConfig(**llama_family_kwargs(m, eos_token_id), num_local_experts=m.moe.num_experts,
                        num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.aux_loss_coef,
                        router_jitter_noise=0.0)
    cfg.architectures = ["MixtralForCausalLM"]
    return cfg


def _gain(w: Weights, name: str) -> torch.Tensor | None:
    return w.get(name) if w.config.model.layerscale_init is not None else None


def _scaled(weight: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """A LayerScale gain folded into the rows of the projection whose output it scales."""
    return weight if gain is None else gain[:, None] * weight


def mixtral_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    m = w.config.model
    yield "model.embed_tokens.weight", w.get("tok_emb.weight")
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        yield h + "input_layernorm.weight", w.get(p + "attn_norm.weight")
        yield h + "post_attention_layernorm.weight", w.get(p + "mlp_norm.weight")
        for x in "qkv":
            yield f"{h}self_attn.{x}_proj.weight", w.get(f"{p}attn.{x}_proj.weight")
        yield h + "self_attn.o_proj.weight", _scaled(w.get(p + "attn.o_proj.weight"), _gain(w, p + "attn_scale.gamma"))
        moe = p + "mlp.moe.deepspeed_moe."
        yield h + "mlp.gate.weight", w.get(moe + "gate.wg.weight")
        experts = [f"{moe}experts.deepspeed_experts.{e}." for e in range(m.moe.num_experts)]
        yield h + "mlp.experts.gate_up_proj", torch.stack(
            [torch.cat([w.get(e + "gate_proj.weight"), w.get(e + "up_proj.weight")]) for e in experts])
        mlp_gain = _gain(w, p + "mlp_scale.gamma")  # scales the sum of the experts' outputs: each expert's rows
        yield h + "mlp.experts.down_proj", torch.stack(
            [_scaled(w.get(e + "down_proj.weight"), mlp_gain) for e in experts])
    yield "model.norm.weight", w.get("norm_f.weight")
    if not m.tie_embeddings:
        yield "lm_head.weight", w.get("lm_head.weight")

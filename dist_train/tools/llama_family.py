"""What the transformers classes of Llama's family (Llama, Mixtral, Qwen3) share in an export: the layout they
compute, the refusal of a model they do not, and in the config our shape fields under their names, RoPE as
`rope_parameters`, and the EOS token as BOS and EOS."""

from __future__ import annotations

from typing import Any

from dist_train.config import ConfigError, ModelConfig

LLAMA_LAYOUT = ("rmsnorm", "rope", "swiglu")
"""model.norm, model.pos, model.mlp of the family."""


def refuse_if_any(reasons: list[tuple[bool, str]], intro: str, needs: str) -> None:
    """Raise a ConfigError "intro: the reasons that hold. needs" when any (holds, reason) pair holds."""
    found = [reason for holds, reason in reasons if holds]
    if found:
        raise ConfigError(f"{intro}: {'; '.join(found)}. {needs}")


def llama_family_kwargs(m: ModelConfig, eos_token_id: int | None) -> dict[str, Any]:
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                head_dim=m.head_dim, max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps,
                tie_word_embeddings=m.tie_embeddings, hidden_act="silu", attention_dropout=m.dropout,
                initializer_range=m.init_std, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                bos_token_id=eos_token_id, eos_token_id=eos_token_id)

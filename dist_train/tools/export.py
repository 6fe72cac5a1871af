"""Export a checkpoint (or averaged weights) as a `transformers` folder that loads with no custom code.

    python -m dist_train.export --run RUN --out DIR [--step N | --weights DIR] [--dtype fp32|bf16]

rmsnorm + rope + swiglu models become `LlamaForCausalLM` (`MixtralForCausalLM` with model.moe, where the layout
matches: `dist_train.tools.export_moe`; `Qwen3ForCausalLM` with model.qk_norm: `dist_train.tools.export_qwen3`),
layernorm + learned positions + gelu ones `GPT2LMHeadModel` (not with model.qk_norm, which GPT-2 has no place for);
encoder-decoders (model.arch=encoder_decoder) become `T5ForConditionalGeneration` (pre-norm, T5 v1.1's layout) or
`BartForConditionalGeneration` (post-norm) and load with `AutoModelForSeq2SeqLM` (`dist_train.tools.export_seq2seq`);
a model trained from `model.hf_config` keeps its own architecture. The folder holds `config.json`,
`generation_config.json`, safetensors weights (sharded above --max-shard-size, with `model.safetensors.index.json`)
and the run's tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` both work.

The tensors are pure renamings of ours (see `dist_train.model`) except where the HF model has no place for
one of our options, where an exact equivalent is written instead: LayerScale gains are folded into the rows
of the projection they scale, GPT-2's missing bias options become zero biases, grouped key/value heads are
repeated for GPT-2 (which only has multi-head attention), and GPT-2's Conv1D weights are transposed.

Memory: the weights are consolidated one tensor at a time (`dist_train.weights`, lazy even from ZeRO-3
shards) and written one output shard at a time, so at most one shard of converted tensors is held.

--out is a new folder or one export wrote before (`dist_train.tools.output_folder`: anything else is refused),
and the checkpoint is checked against its files.json before it is read (`--no-verify-hashes`: sizes only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.safe_load import UnsafeCheckpointError, add_trust_argument
from dist_train.checkpoint.verify import CorruptCheckpoint, add_verify_argument
from dist_train.checkpoint.weights import Weights, open_weights
from dist_train.config import Config, ConfigError, ModelConfig
from dist_train.distributed.process_group import deepspeed_logs_to_stderr
from dist_train.formats.atomic_file import apply_umask_modes
from dist_train.model.hf import load_hf_config
from dist_train.tools.export_moe import check_mixtral, mixtral_config, mixtral_tensors
from dist_train.tools.export_qwen3 import check_qwen3, qk_norm_tensors, qwen3_config
from dist_train.tools.llama_family import LLAMA_LAYOUT
from dist_train.tools.export_seq2seq import bart_tensors, seq2seq_config, seq2seq_family, t5_tensors
from dist_train.tools.output_folder import check_output_folder, output_folder

GPT2 = ("layernorm", "learned", "gelu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOOL = "dist_train.export"


def family(m: ModelConfig) -> str:
    """`llama`, `gpt2`, `mixtral`, `qwen3`, `t5`, `bart` or `hf` (a model.hf_config model); refuse a mix no HF
    class computes."""
    if m.hf_config:
        return "hf"
    if m.moe.enabled:
        check_mixtral(m)
        return "mixtral"
    if m.arch == "encoder_decoder":
        return seq2seq_family(m)
    if m.qk_norm:
        check_qwen3(m)
        return "qwen3"
    if m.norm_position == "post":
        raise ConfigError("model.norm_position=post has no decoder-only transformers class (GPT-2 and Llama are "
                          "pre-norm): export needs norm_position=pre")
    kind = (m.norm, m.pos, m.mlp)
    if kind == LLAMA_LAYOUT:
        return "llama"
    if kind == GPT2:
        return "gpt2"
    raise ConfigError(f"model.norm/pos/mlp = {'/'.join(kind)} has no transformers class without custom code: "
                      f"export needs {'/'.join(LLAMA_LAYOUT)} (LlamaForCausalLM) or {'/'.join(GPT2)} (GPT2LMHeadModel)")


def hf_config(m: ModelConfig, eos_token_id: int | None) -> Any:
    from transformers import GPT2Config, LlamaConfig

    if family(m) == "hf":
        cfg = load_hf_config(m.hf_config)
        if not cfg.architectures:  # the class the trainer built (AutoModelFor...from_config), for readers
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            )

            names = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if m.arch == "decoder"
                     else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
            cfg.architectures = [names[cfg.model_type]]
        return cfg
    if family(m) in ("t5", "bart"):
        return seq2seq_config(m, eos_token_id)
    if family(m) == "mixtral":
        return mixtral_config(m, eos_token_id)
    if family(m) == "qwen3":
        return qwen3_config(m, eos_token_id)
    if family(m) == "llama":
        cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                          num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                          num_key_value_heads=m.kv_heads, head_dim=m.head_dim, max_position_embeddings=m.seq_len,
                          rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                          attention_bias=m.bias, mlp_bias=m.bias, attention_dropout=m.dropout, hidden_act="silu",
                          initializer_range=m.init_std, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    else:
        cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                         n_head=m.n_heads, n_inner=m.d_ff, activation_function="gelu_new",
                         layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout, embd_pdrop=m.dropout,
                         attn_pdrop=m.dropout, initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    cfg.architectures = ["LlamaForCausalLM" if family(m) == "llama" else "GPT2LMHeadModel"]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Our tensors -> HF tensors, one block at a time.

def _linear(w: Weights, name: str, bias: bool, gain: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)) of one of our Linear layers; a missing bias is zeros. `gain` names a
    LayerScale that multiplies the layer's output: folded into its rows (gamma * (W x + b))."""
    weight = w.get(f"{name}.weight")
    b = w.get(f"{name}.bias") if bias else torch.zeros(weight.shape[0])
    if gain is not None:
        gamma = w.get(gain)
        weight, b = gamma[:, None] * weight, gamma * b
    return weight, b


def _norm(w: Weights, name: str, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    weight = w.get(f"{name}.weight")
    return weight, (w.get(f"{name}.bias") if bias else torch.zeros_like(weight))


def llama_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    m = w.config.model
    gains = m.layerscale_init is not None
    yield "model.embed_tokens.weight", w.get("tok_emb.weight")
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        yield h + "input_layernorm.weight", w.get(p + "attn_norm.weight")
        yield h + "post_attention_layernorm.weight", w.get(p + "mlp_norm.weight")
        layers = [("attn.q_proj", "self_attn.q_proj", None), ("attn.k_proj", "self_attn.k_proj", None),
                  ("attn.v_proj", "self_attn.v_proj", None),
                  ("attn.o_proj", "self_attn.o_proj", p + "attn_scale.gamma" if gains else None),
                  ("mlp.gate_proj", "mlp.gate_proj", None), ("mlp.up_proj", "mlp.up_proj", None),
                  ("mlp.down_proj", "mlp.down_proj", p + "mlp_scale.gamma" if gains else None)]
        for ours, theirs, gain in layers:
            weight, bias = _linear(w, p + ours, m.bias, gain)
            yield f"{h}{theirs}.weight", weight
            if m.bias:
                yield f"{h}{theirs}.bias", bias
    yield "model.norm.weight", w.get("norm_f.weight")
    if not m.tie_embeddings:
        yield "lm_head.weight", w.get("lm_head.weight")


def qwen3_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen3 is named as Llama, plus each layer's q/k norms."""
    return itertools.chain(llama_tensors(w), qk_norm_tensors(w))


def _all_heads(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Repeat each key/value head for the n_heads/n_kv_heads query heads it serves (our repeat_interleave),
    so that multi-head attention computes exactly what grouped-query attention did."""
    rep = m.n_heads // m.kv_heads
    return t.view(m.kv_heads, m.head_dim, *t.shape[1:]).repeat_interleave(rep, 0).reshape(m.d_model, *t.shape[1:])


def gpt2_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    m = w.config.model
    gains = m.layerscale_init is not None
    yield "transformer.wte.weight", w.get("tok_emb.weight")
    yield "transformer.wpe.weight", w.get("pos_emb.weight")
    for i in range(m.n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            weight, bias = _norm(w, p + ours, m.bias)
            yield f"{h}{theirs}.weight", weight
            yield f"{h}{theirs}.bias", bias
        q, k, v = (_linear(w, f"{p}attn.{x}_proj", m.bias) for x in "qkv")
        # GPT-2's Conv1D stores weights as (in, out): concatenate q, k, v along out, then transpose.
        yield h + "attn.c_attn.weight", torch.cat([q[0], _all_heads(k[0], m), _all_heads(v[0], m)]).t()
        yield h + "attn.c_attn.bias", torch.cat([q[1], _all_heads(k[1], m), _all_heads(v[1], m)])
        for ours, theirs, gain in (("attn.o_proj", "attn.c_proj", "attn_scale.gamma"),
                                   ("mlp.up_proj", "mlp.c_fc", None),
                                   ("mlp.down_proj", "mlp.c_proj", "mlp_scale.gamma")):
            weight, bias = _linear(w, p + ours, m.bias, p + gain if gains and gain else None)
            yield f"{h}{theirs}.weight", weight.t()
            yield f"{h}{theirs}.bias", bias
    weight, bias = _norm(w, "norm_f", m.bias)
    yield "transformer.ln_f.weight", weight
    yield "transformer.ln_f.bias", bias
    if not m.tie_embeddings:
        yield "lm_head.weight", w.get("lm_head.weight")


def hf_model_tensors(w: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """A model.hf_config model is `HFCausalLM.model`: its names are the HF names behind a `model.` prefix. A
    tied output head is left out, as `save_pretrained` does (safetensors refuses two names for one tensor, and
    `from_pretrained` ties it again)."""

    tied = getattr(load_hf_config(w.config.model.hf_config), "tie_word_embeddings", False)
    for name in w.names:
        hf_name = name.removeprefix("model.")
        if not (tied and hf_name == "lm_head.weight"):
            yield hf_name, w.get(name)


# ----------------------------------------------------------------------------------------------------------
# Writing.

def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1024' -> bytes (at least 1); anything else is a ValueError naming --max-shard-size."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    number, factor = text, 1
    for unit, unit_factor in units.items():
        if text.upper().endswith(unit):
            number, factor = text[: -len(unit)], unit_factor
            break
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):  # not a number, nan, inf
        raise ValueError(f"--max-shard-size {text!r} is not a size: give e.g. 2GB, 500MB or 1000000 (bytes)") from None
    if size < 1:
        raise ValueError(f"--max-shard-size must be at least 1 byte, not {text!r}: give e.g. 2GB or 500MB")
    return size


def write_shards(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int,
                 dtype: torch.dtype) -> list[str]:
    """Write safetensors shards of at most max_shard_bytes (a bigger single tensor gets its own shard),
    holding one shard in memory; name them as `save_pretrained` does. Returns the file names."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total_bytes = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        save_file(pending, str(out / f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shards.append(list(pending))
        weight_map.update({name: len(shards) - 1 for name in pending})
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        tensor = tensor.to(dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
    if pending:
        flush()
    if len(shards) == 1:
        (out / "part-00000.safetensors").rename(out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        (out / f"part-{i:05d}.safetensors").rename(out / name)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {tensor: names[i] for tensor, i in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def tokenizer_path(cfg: Config) -> Path | None:
    """The tokenizer folder named by the manifest of the run's (first) data source."""
    from dist_train.formats.manifest import read_manifest

    for path, _ in cfg.data.weighted_paths():
        try:
            return Path(read_manifest(path)["tokenizer"])
        except (OSError, ValueError):
            continue
    return None


def save_tokenizer(tokenizer_dir: Path, out: Path, seq_len: int) -> int | None:
    """Copy the tokenizer into the export; returns its EOS id."""
    from dist_train.formats.tokenizer_folder import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.model_max_length = seq_len
    tok.save_pretrained(str(out))
    return tok.eos_token_id


def export(w: Weights, out: Path, tokenizer_dir: Path | None = None, dtype: str = "fp32",
           max_shard_bytes: int = 2 * 10**9) -> Path:
    """Write the HF folder into OUT.tmp and rename it to OUT when complete (`output_folder`: OUT is new or a
    previous export, anything else is refused with OutputFolderError)."""
    m = w.config.model
    kind = family(m)
    if tokenizer_dir is not None and tokenizer_dir.is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir} is a file: pass the folder {tokenizer_dir.parent}")
    tokenizer_dir = tokenizer_dir or tokenizer_path(w.config)
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"cannot find the tokenizer of {w.source} (the manifest of data.path names "
                                f"{tokenizer_dir}); pass --tokenizer DIR")
    with output_folder(out, TOOL) as tmp:
        eos = save_tokenizer(tokenizer_dir, tmp, m.seq_len)
        config = hf_config(m, eos)
        # As a string, which every transformers version serialises ("dtype" is the name from 4.56 on, which
        # `from_pretrained` reads back as a torch.dtype; pyproject declares the version the tests run with).
        config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
        config.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        tensors = {"llama": llama_tensors, "gpt2": gpt2_tensors, "t5": t5_tensors, "bart": bart_tensors,
                   "hf": hf_model_tensors, "mixtral": mixtral_tensors, "qwen3": qwen3_tensors}[kind](w)
        write_shards(tmp, tensors, max_shard_bytes, DTYPES[dtype])
        (tmp / "dist_train.json").write_text(json.dumps({"source": w.source, **w.meta, "family": kind}, indent=2))
        apply_umask_modes(tmp)  # safetensors writes 0600 whatever the umask
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder (its checkpoints/latest unless --step)")
    parser.add_argument("--step", type=int, help="export the checkpoint of this step")
    parser.add_argument("--weights", type=Path, help="export a weights folder (from dist_train.average)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: a new one, or one export wrote before (replaced when complete)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the one in the run's manifest)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_trust_argument(parser)
    add_verify_argument(parser)
    args = parser.parse_args(argv)
    if args.weights is not None and args.step is not None:
        parser.error("--step and --weights exclude each other")
    try:  # the cheap refusals first, before DeepSpeed is imported or any checkpoint read
        max_shard_bytes = parse_size(args.max_shard_size)
        check_output_folder(args.out, TOOL)
    except ValueError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    deepspeed_logs_to_stderr()
    try:
        w = open_weights(args.run, args.step, args.weights, trust=args.trust_checkpoint, verify=args.verify)
        out = export(w, args.out, args.tokenizer, args.dtype, max_shard_bytes)
    except (ConfigError, FileNotFoundError, ValueError, UnsafeCheckpointError, CorruptCheckpoint) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    result = {"out": str(out), "source": w.source, "family": family(w.config.model), **w.meta}
    print(json.dumps(result) if args.json else f"exported {w.source} as {result['family']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

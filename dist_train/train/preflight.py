"""Checks of a config against the data and the machine, run before any process group starts.

`dist_train.config.validate` checks the config on its own; these need the shard manifests, the tokenizer's
vocabulary, the world size and the GPU (presence, memory against the estimate of `dist_train.scaling.memory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dist_train.config import Config, ConfigError, data_parallel_size, resolve_grad_accum
from dist_train.config.validation import check_parallel_heads
from dist_train.data.span_corruption import sentinel_room_message, span_lengths
from dist_train.formats.manifest import ManifestError, check_shards, check_token_ids, read_manifest
from dist_train.model.hf import load_hf_config
from dist_train.model.build import model_vocab_size


def check_data(cfg: Config) -> list[dict[str, Any]]:
    """Every data source exists, fits the model's vocabulary, holds at least one sequence, and its shards have
    their sizes and only token ids of its vocabulary."""
    key = "data.path" if cfg.data.path else "data.sources"
    model_vocab, vocab_key = model_vocab_size(cfg)
    splits = ("train", "val") if cfg.train.eval_every else ("train",)  # the splits the run reads
    manifests = []
    for path, _ in cfg.data.weighted_paths():
        manifest = _read_source(path, key)
        if manifest["vocab_size"] > model_vocab:
            raise ConfigError(
                f"{vocab_key} ({model_vocab}) is smaller than the tokenizer's vocabulary "
                f"({manifest['vocab_size']}, from {path}/manifest.json); set {vocab_key}="
                f"{_round_up(manifest['vocab_size'], 64)} (rounded up to a multiple of 64)")
        if cfg.model.arch == "encoder_decoder":
            check_sentinel_room(cfg, manifest["vocab_size"], model_vocab, vocab_key)
        for split in ("train", "val"):
            tokens = manifest["splits"].get(split, {}).get("num_tokens", 0)
            if split == "val" and tokens == 0 and cfg.train.eval_every == 0:
                continue
            if tokens < cfg.model.seq_len + 1:
                raise ConfigError(
                    f"model.seq_len ({cfg.model.seq_len}) is longer than the {split} split of {path} "
                    f"({tokens} tokens); lower model.seq_len or add data")
        try:  # sizes by one stat per shard; ids by the manifest's record and three small reads per shard
            check_shards(path, manifest, splits)
            check_token_ids(path, manifest, splits)
        except ManifestError as e:
            raise ConfigError(f"{key}: {e}") from None
        manifests.append(manifest)
    check_same_tokenizer(cfg.data.weighted_paths(), manifests)
    return manifests


def _read_source(path: str, key: str) -> dict[str, Any]:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: {path} does not exist; make it with `python -m data_prep.shard "
                          f"--input ... --tokenizer ... --out {path}`")
    try:
        return read_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _tokenizer_identity(manifest: dict[str, Any]) -> tuple[Any, ...]:
    """What makes token ids mean the same: the tokenizer's files (their hash, when the manifest records it),
    else its folder, plus the vocabulary and EOS id."""
    sha = manifest.get("prep", {}).get("tokenizer_sha256")
    return (sha or manifest.get("tokenizer"), manifest["vocab_size"], manifest.get("eos_token_id"))


def check_same_tokenizer(paths: list[tuple[str, float]], manifests: list[dict[str, Any]]) -> None:
    """Mixed sources must share one tokenizer: the same id means another token in each otherwise."""
    if len(manifests) < 2:
        return
    first_path, first = paths[0][0], manifests[0]
    for (path, _), manifest in zip(paths[1:], manifests[1:]):
        if _tokenizer_identity(manifest) != _tokenizer_identity(first):
            raise ConfigError(
                f"data.sources: {path} was made by another tokenizer than {first_path} ({manifest.get('tokenizer')}, "
                f"vocab {manifest['vocab_size']} vs {first.get('tokenizer')}, vocab {first['vocab_size']}): the "
                f"same token id would mean different text. Re-shard {path} with `python -m data_prep.shard "
                f"--tokenizer {first.get('tokenizer')} ...`", ("data.sources",))


def check_sentinel_room(cfg: Config, tokenizer_vocab: int, model_vocab: int, key: str) -> None:
    """Span corruption's sentinels take the top ids of the model's vocabulary: none may be a real token."""
    spans = span_lengths(cfg.model.seq_len, cfg.data.noise_density, cfg.data.mean_noise_span_length).spans
    if model_vocab - spans < tokenizer_vocab:
        raise ConfigError(sentinel_room_message(model_vocab, tokenizer_vocab, spans).replace("model.vocab_size", key),
                          ("model.vocab_size",) if key == "model.vocab_size" else ())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cpu_runs_fp16() -> bool:
    """Whether DeepSpeed's CPU accelerator takes fp16 here: it asks oneDNN (as its `is_fp16_supported` does), which
    says yes on CPUs with AVX512-FP16 or AMX-FP16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_machine(cfg: Config) -> None:
    if cfg.precision == "fp16" and not torch.cuda.is_available() and not cpu_runs_fp16():
        raise ConfigError("precision=fp16 needs a CUDA GPU or a CPU with fp16 arithmetic (AVX512-FP16 or AMX-FP16; "
                          "DeepSpeed refuses fp16 on this one); use precision=bf16 or precision=fp32 here")
    if cfg.model.attention == "flex" and not torch.cuda.is_available():
        raise ConfigError("model.attention=flex needs a CUDA GPU: torch's FlexAttention has no backward on the CPU; "
                          "use model.attention=auto here (SDPA with a boolean document mask)")


def check_positions(cfg: Config) -> None:
    """An `hf_config` model has a fixed number of positions (ours has seq_len learned ones, RoPE or relative
    ones) and is a causal or a seq2seq LM, which model.arch must name."""
    if cfg.model.hf_config is None:
        return

    hf = load_hf_config(cfg.model.hf_config)
    seq2seq = bool(getattr(hf, "is_encoder_decoder", False))
    if seq2seq != (cfg.model.arch == "encoder_decoder"):
        kind = "an encoder-decoder" if seq2seq else "a decoder-only"
        raise ConfigError(f"model.hf_config ({cfg.model.hf_config}) is {kind} model ({hf.model_type}) but "
                          f"model.arch={cfg.model.arch}; set model.arch={'encoder_decoder' if seq2seq else 'decoder'}")
    limit = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    if limit is not None and cfg.model.seq_len > limit:
        raise ConfigError(f"model.seq_len ({cfg.model.seq_len}) is longer than the model's positions "
                          f"({limit}, max_position_embeddings in {cfg.model.hf_config}); lower model.seq_len")


def check_parallel(cfg: Config, world_size: int) -> None:
    """The world divides into tensor/sequence-parallel groups; an hf_config model's heads divide by their sizes,
    and under sequence parallelism its attention goes through a function DeepSpeed's ALST can wrap (sdpa)."""
    data_parallel_size(cfg, world_size)
    p = cfg.parallel
    if cfg.model.hf_config is None or (p.tensor == 1 and p.sequence == 1):
        return
    from transformers import AutoModelForCausalLM

    hf = load_hf_config(cfg.model.hf_config).get_text_config()
    heads = hf.num_attention_heads
    check_parallel_heads(p, heads, getattr(hf, "num_key_value_heads", None) or heads,
                         f"num_attention_heads, num_key_value_heads in {cfg.model.hf_config}")
    if p.sequence > 1:
        model_class = AutoModelForCausalLM._model_mapping[type(load_hf_config(cfg.model.hf_config))]
        if not getattr(model_class, "_supports_sdpa", False):
            raise ConfigError(
                f"parallel.sequence={p.sequence}: {model_class.__name__} (model.hf_config {cfg.model.hf_config}) has "
                f"no sdpa attention, the path DeepSpeed's Ulysses wraps (UlyssesSPAttentionHF replaces the sdpa "
                f"function; eager attention builds a T x T mask per rank); set parallel.sequence=1 or train an "
                f"architecture with sdpa attention (Llama, Qwen2, GPT-2, ...)")


def check_memory(cfg: Config, world_size: int, device_bytes: int) -> None:
    """The estimated peak per GPU (`dist_train.scaling.memory`: ZeRO stage, tensor-parallel shards,
    sequence-parallel slices, recomputation) fits a device of `device_bytes`."""
    if cfg.model.hf_config:  # activations are estimated for our Transformer only
        return
    from dist_train.scaling.memory import estimate_memory

    peak = estimate_memory(cfg, world_size).peak(cfg.model.grad_checkpointing)
    if peak > device_bytes:
        p = cfg.parallel
        raise ConfigError(
            f"the estimated peak memory per GPU, {peak / 2**30:.1f} GiB (ZeRO-{cfg.deepspeed.zero_stage}, "
            f"parallel.tensor={p.tensor}, parallel.sequence={p.sequence}, model.grad_checkpointing="
            f"{str(cfg.model.grad_checkpointing).lower()}, train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"model.seq_len={cfg.model.seq_len}), exceeds the GPU's {device_bytes / 2**30:.1f} GiB; raise "
            f"parallel.sequence (activations) or parallel.tensor / deepspeed.zero_stage (model states), or set "
            f"model.grad_checkpointing=true; `python -m dist_train.scaling memory` shows each term")


def preflight(cfg: Config, world_size: int, this_machine: bool = True) -> None:
    """Everything that can be refused before launch, refused with the key and the fix. `this_machine=False`
    (a job submitted to a cluster) skips the checks of the machine it runs on: training runs elsewhere."""
    if this_machine:
        check_machine(cfg)
    check_positions(cfg)
    check_parallel(cfg, world_size)
    resolve_grad_accum(cfg, world_size)
    check_data(cfg)
    if this_machine and torch.cuda.is_available():  # the GPU of this machine
        check_memory(cfg, world_size, torch.cuda.get_device_properties(0).total_memory)

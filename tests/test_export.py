"""HF export: the `transformers` model loaded from the folder (no custom code) computes our logits within 1e-5
and generates the same greedy tokens, for the Llama, Qwen3 (q/k norms) and GPT-2 families and from a ZeRO-3
checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from distributed_helpers import REPO, cpu_env
from resume_helpers import STEPS, TINY, checkpoint, shared_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_train.checkpoint.weights import checkpoint_weights, open_weights, save_weights_folder
from dist_train.config import ConfigError, load_config
from dist_train.model.build import build_model
from dist_train.model.decoder import Transformer
from dist_train.monitor.tensor_bytes import NewTensorBytes
from dist_train.tools.export import export, family

LLAMA_VARIANT = ("model.n_kv_heads=2", "model.tie_embeddings=false", "model.bias=true", "model.layerscale_init=0.5")
QWEN3_VARIANT = ("model.qk_norm=true", "model.n_kv_heads=2", "model.tie_embeddings=false", "model.layerscale_init=0.5")
GPT2 = ("model.norm=layernorm", "model.pos=learned", "model.mlp=gelu", "model.bias=true")
GPT2_VARIANT = (*GPT2, "model.n_kv_heads=2", "model.layerscale_init=0.5")
GPT2_NO_BIAS_UNTIED = ("model.norm=layernorm", "model.pos=learned", "model.mlp=gelu", "model.bias=false",
                       "model.tie_embeddings=false")


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, eos: int) -> list[int]:
    """Our own greedy decoding: full recompute each step, stop at EOS like `generate`."""
    ids = prompt
    for _ in range(new_tokens):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    return ids[0, prompt.shape[1]:].tolist()


def assert_hf_matches(ours: torch.nn.Module, hf_dir, batch: torch.Tensor) -> None:
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ours.eval()
    with torch.no_grad():
        gap = (ours(batch) - hf(batch).logits).abs().max().item()
    prompt = batch[:1, :16]
    mine = greedy(ours, prompt, 16, tok.eos_token_id)
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id,
                         attention_mask=torch.ones_like(prompt))[0, 16:].tolist()
    print(f"{type(hf).__name__}: max |logit gap| {gap:.2e}; greedy {theirs}; text {tok.decode(theirs)!r}")
    assert gap < 1e-5
    assert theirs == mine and len(theirs) > 0


@pytest.mark.parametrize("variant", [LLAMA_VARIANT, QWEN3_VARIANT, ("model.qk_norm=true",), GPT2_VARIANT,
                                     GPT2_NO_BIAS_UNTIED],
                         ids=["llama-gqa-untied-bias-layerscale", "qwen3-gqa-untied-layerscale", "qwen3-tied",
                              "gpt2-gqa-layerscale", "gpt2-nobias-untied"])
def test_export_of_every_option_computes_our_logits(tokenizer_dir, tmp_path, variant):
    """Random weights (norm gains, biases and LayerScale perturbed so none is trivial) through a weights
    folder: the options without an HF field (LayerScale, GQA in GPT-2, no bias) are exported exactly, and q/k norms
    (perturbed per channel too) as Qwen3's."""
    cfg = load_config(TINY, ["data.path=unused", "model.n_layers=2", "model.init_std=0.08", *variant])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    tensors = {k: v for k, v in model.state_dict().items() if not (cfg.model.tie_embeddings and k == "lm_head.weight")}
    save_weights_folder(tmp_path / "weights", tensors, cfg, {"steps": [0]})
    out = export(open_weights(weights=tmp_path / "weights"), tmp_path / "hf", tokenizer_dir, max_shard_bytes=300_000)
    assert (out / "model.safetensors.index.json").exists(), "small shards force a sharded export"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    batch = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    expected = "Qwen3ForCausalLM" if cfg.model.qk_norm else "LlamaForCausalLM" if cfg.model.norm == "rmsnorm" \
        else "GPT2LMHeadModel"
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected]
    assert_hf_matches(model, out, batch)


def test_a_model_no_transformers_class_computes_is_refused():
    cfg = load_config(TINY, ["data.path=unused", "model.norm=layernorm"])  # layernorm + rope + swiglu
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        family(cfg.model)


@pytest.mark.parametrize("override, reason", [
    (GPT2, r"Qwen3 is rmsnorm/rope/swiglu"),
    (("model.bias=true",), "Qwen3's MLP has no biases"),
    (("model.norm_position=post",), "Qwen3 is pre-norm"),
])
def test_q_k_norms_in_a_layout_qwen3_does_not_compute_are_refused_at_export_with_the_reason(override, reason):
    cfg = load_config(TINY, ["data.path=unused", "model.qk_norm=true", *override])
    with pytest.raises(ConfigError, match=reason) as e:
        family(cfg.model)
    assert "model.qk_norm=true exports as Qwen3ForCausalLM" in str(e.value)


def test_q_k_norms_in_an_moe_or_encoder_decoder_model_are_refused_at_export():
    moe = load_config(REPO / "configs" / "moe-tiny.yaml", ["data.path=unused", "model.qk_norm=true"])
    with pytest.raises(ConfigError, match="Mixtral's attention has no q/k norms"):
        family(moe.model)
    seq2seq = load_config(TINY, ["data.path=unused", "model.arch=encoder_decoder", "model.pos=relative",
                                 "model.qk_norm=true"])
    with pytest.raises(ConfigError, match="neither T5's nor BART's attention has q/k norms"):
        family(seq2seq.model)


@pytest.mark.parametrize("override, reason", [
    ("model.moe.every=2", "an MoE MLP in every block"),
    ("model.moe.capacity_factor=1.25", "dropless"),
    ("model.moe.shared_experts=1", "no shared experts"),
    ("model.moe.top_k=1", "renormalises it to 1"),
    ("model.mlp=gelu", "rmsnorm/rope/swiglu"),
])
def test_an_moe_layout_mixtral_does_not_compute_is_refused_at_export_with_the_reason(override, reason):
    cfg = load_config(REPO / "configs" / "moe-tiny.yaml", ["data.path=unused", override])
    with pytest.raises(ConfigError, match=reason):
        family(cfg.model)


def val_batch(shard_dir, seq_len: int) -> torch.Tensor:
    from dist_train.data.loader import TokenLoader

    loader = TokenLoader([(str(shard_dir), 1.0)], "val", seq_len, 4, 0, 1, 0)
    return loader.next_batch()[0]


def ours_from_checkpoint(path) -> torch.nn.Module:
    weights = checkpoint_weights(path)
    return weights.load_into(build_model(weights.config.model))


@pytest.mark.slow
def test_export_of_a_zero3_checkpoint_is_a_llama_that_matches_ours(tmp_path_factory, shard_dir, tmp_path):
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero3_x2", 2, "deepspeed.zero_stage=3")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "dist_train.export", "--run", str(run_dir), "--out", str(out),
                           "--json"], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON alone (DeepSpeed logs go to stderr)
    assert result["family"] == "llama" and result["step"] == STEPS
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    ours = ours_from_checkpoint(checkpoint(run_dir, STEPS))
    assert_hf_matches(ours, out, val_batch(shard_dir, 128))


@pytest.mark.slow
def test_export_of_a_trained_gpt2_family_run_is_a_gpt2_that_matches_ours(tmp_path_factory, shard_dir, tmp_path):
    run_dir = shared_run(tmp_path_factory, shard_dir, "gpt2_x1", 1, *GPT2, "train.max_steps=2")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "dist_train.export", "--run", str(run_dir), "--out", str(out)],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    ours = ours_from_checkpoint(checkpoint(run_dir, 2))
    assert_hf_matches(ours, out, val_batch(shard_dir, 128))


@pytest.mark.slow
def test_export_holds_one_shard_of_the_weights_at_a_time(tmp_path_factory, shard_dir, tmp_path, tokenizer_dir):
    """Consolidating the ZeRO-3 shards (opening the checkpoint and gathering each tensor from its per-rank
    slices, DeepSpeed's zero_to_fp32) and writing the HF files never holds the whole model: every tensor torch
    creates from opening to the last file counts, and at any moment those alive fit in one output shard plus the
    largest tensor (here the embedding, 41% of this tiny model)."""
    run_dir = shared_run(tmp_path_factory, shard_dir, "zero3_x2", 2, "deepspeed.zero_stage=3")
    ckpt = checkpoint(run_dir, STEPS)
    weights = checkpoint_weights(ckpt)
    sizes = [weights.get(name).numel() * 4 for name in weights.unique_names]
    total, largest = sum(sizes), max(sizes)
    with NewTensorBytes() as allocated:
        export(checkpoint_weights(ckpt), tmp_path / "hf", tokenizer_dir, max_shard_bytes=total // 8)
    print(f"model {total / 1e6:.2f} MB, largest tensor {largest / 1e6:.2f} MB, shards of {total // 8 / 1e6:.2f} MB: "
          f"peak of the tensors alive during consolidation and export {allocated.peak / 1e6:.2f} MB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 6
    assert 0 < allocated.peak <= total // 8 + largest and allocated.peak < total / 2

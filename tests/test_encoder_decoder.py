"""The encoder-decoder (model.arch=encoder_decoder): exact parameter counts against transformers, and the export
computes our logits within 1e-5 and generates our greedy tokens, pre-norm as T5 v1.1 and post-norm as BART."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import REPO
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from dist_train.checkpoint.weights import open_weights, save_weights_folder
from dist_train.config import ConfigError, load_config
from dist_train.model.count import count_params
from dist_train.model.encoder_decoder import EncoderDecoder
from dist_train.tools.export import export, family, hf_config

T5_TINY = REPO / "configs" / "t5-tiny.yaml"
T5_BASE = REPO / "configs" / "t5-base.yaml"
T5_LAYOUT = ("model.norm_position=pre", "model.norm=rmsnorm", "model.pos=relative", "model.bias=false",
             "model.tie_embeddings=true")
BART_LAYOUT = ("model.norm_position=post", "model.norm=layernorm", "model.pos=learned", "model.mlp=gelu",
               "model.bias=true", "model.norm_eps=1e-5")
EOS = 0


def config(*overrides: str):
    return load_config(T5_TINY, ["data.path=unused", "model.n_layers=2", "model.init_std=0.08", *overrides])


@pytest.mark.parametrize("options", [
    T5_LAYOUT, BART_LAYOUT,
    ("model.pos=rope", "model.mlp=swiglu", "model.n_kv_heads=2", "model.layerscale_init=0.1",
     "model.tie_embeddings=false", "model.bias=true", "model.norm=layernorm"),
    ("model.norm_position=post", "model.pos=learned", "model.mlp=gelu", "model.grad_checkpointing=true"),
    (*T5_LAYOUT, "model.n_kv_heads=2", "model.qk_norm=true"),
], ids=["t5", "bart", "rope-gqa-layerscale-untied-bias", "post-learned", "t5-gqa-qk-norm"])
def test_count_equals_the_built_models_parameters(options):
    cfg = config(*options)
    model = EncoderDecoder(cfg.model)
    assert count_params(cfg.model).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", [T5_TINY, T5_BASE], ids=["t5-tiny", "t5-v1_1-base"])
def test_count_equals_transformers_t5_num_parameters(path):
    cfg = load_config(path, ["data.path=unused"])
    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(hf_config(cfg.model, EOS))
    ours = count_params(cfg.model).total
    print(f"{path.name}: ours {ours:,}, transformers num_parameters() {t5.num_parameters():,}")
    assert ours == t5.num_parameters()
    if path == T5_BASE:
        assert ours == 222_903_552  # google/t5-v1_1-base's shape, the shared embedding once


def perturbed(cfg) -> EncoderDecoder:
    """Random weights with norm gains, biases, LayerScale and the position tables perturbed so none is trivial."""
    torch.manual_seed(0)
    model = EncoderDecoder(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")) or "norm" in name or "rel_bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def assert_export_matches(model: EncoderDecoder, cfg, tmp_path, tokenizer_dir) -> None:
    tied = cfg.model.tie_embeddings
    tensors = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_weights_folder(tmp_path / "weights", tensors, cfg, {"steps": [0]})
    out = export(open_weights(weights=tmp_path / "weights"), tmp_path / "hf", tokenizer_dir)
    hf = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    encoder_ids = torch.randint(1, 2048, (2, 40), generator=gen)
    decoder_ids = torch.randint(1, 2048, (2, 12), generator=gen)
    with torch.no_grad():
        gap = (model(encoder_ids, decoder_ids) - hf(input_ids=encoder_ids, decoder_input_ids=decoder_ids).logits)
    mine = model.greedy(encoder_ids[:1], EOS, 10)[0].tolist()
    theirs = hf.generate(encoder_ids[:1], max_new_tokens=10, do_sample=False, num_beams=1)[0].tolist()
    print(f"{type(hf).__name__}: max |logit gap| {gap.abs().max().item():.2e}; ours {mine}; generate {theirs}")
    assert gap.abs().max().item() < 1e-5
    assert theirs == mine[:len(theirs)] and (len(theirs) == len(mine) or theirs[-1] == EOS)


@pytest.mark.parametrize("options", [
    (*T5_LAYOUT, "model.mlp=geglu", "model.n_kv_heads=2", "model.layerscale_init=0.5"),
    (*T5_LAYOUT, "model.mlp=gelu"),
    (*BART_LAYOUT, "model.n_kv_heads=2", "model.layerscale_init=0.5", "model.tie_embeddings=false"),
    (*BART_LAYOUT, "model.bias=false", "model.tie_embeddings=true"),
], ids=["pre-t5-geglu-gqa-layerscale", "pre-t5-gelu", "post-bart-gqa-layerscale-untied", "post-bart-nobias-tied"])
def test_export_computes_our_logits_and_generates_our_tokens(options, tmp_path, tokenizer_dir):
    cfg = config(*options)
    assert family(cfg.model) == ("t5" if "model.norm_position=pre" in options else "bart")
    assert_export_matches(perturbed(cfg), cfg, tmp_path, tokenizer_dir)


def test_a_layout_no_seq2seq_class_computes_is_refused():
    with pytest.raises(ConfigError, match="T5 v1.1's"):
        family(config("model.norm_position=post").model)  # post-norm T5: transformers has none
    with pytest.raises(ConfigError, match="norm_position=post has no decoder-only"):
        family(config("model.arch=decoder", "model.pos=rope", "model.norm_position=post").model)


def saved_bytes(model, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("options", [
    ("model.pos=rope", "model.n_kv_heads=2", "model.layerscale_init=0.1"),
    (*BART_LAYOUT,),
    (*T5_LAYOUT, "model.mlp=geglu"),
    ("model.pos=rope", "model.n_kv_heads=2", "model.qk_norm=true"),
], ids=["rope-gqa-layerscale", "bart", "t5", "rope-gqa-qk-norm"])
def test_activation_estimate_equals_the_bytes_autograd_saves(options, precision):
    from dist_train.data.span_corruption import span_lengths
    from dist_train.scaling.memory import activation_bytes

    m = config(*options, "model.attention=sdpa", "model.d_model=64", "model.d_ff=160").model
    lengths, batch = span_lengths(m.seq_len, 0.15, 3.0), 3
    p = 4 if precision == "fp32" else 2
    model = EncoderDecoder(m).to(torch.float32 if precision == "fp32" else torch.bfloat16).train()
    encoder_ids = torch.randint(0, 2048, (batch, lengths.encoder))
    decoder_ids = torch.randint(0, 2048, (batch, lengths.decoder))
    measured = saved_bytes(model, encoder_ids, decoder_ids, decoder_ids)
    loss_transient = batch * lengths.decoder * (p + 4) * m.vocab_size  # freed before the backward: not saved
    estimated = activation_bytes(m, precision, batch, checkpointing=False) - loss_transient
    print(f"{precision}: saved {measured:,} bytes, estimated {estimated:,}")
    if m.pos != "relative":
        assert estimated == pytest.approx(measured, rel=0.005)
    else:
        # The estimate follows the GPU's memory-efficient kernel, which takes the bias's gradient itself; torch's
        # CPU kernel falls back to the math path for that and also keeps the (B, nh, T, T) probabilities (in
        # bf16 more: fp32 copies of them too).
        probabilities = batch * p * m.n_heads * m.n_layers * (lengths.encoder ** 2 + lengths.decoder ** 2)
        assert estimated < measured < estimated + (1 if precision == "fp32" else 3) * probabilities


@pytest.mark.parametrize("position", ["pre", "post"])
def test_decoder_only_norm_position_moves_the_norm_to_the_embeddings(position):
    """Post-norm ("Add & Norm"): every block's input, the embeddings too, is normed and nothing after the last
    block; pre-norm: the embeddings enter raw and the final norm comes last. Same parameters either way."""
    from dist_train.model.decoder import Transformer

    cfg = config("model.arch=decoder", "model.pos=rope", f"model.norm_position={position}").model
    model = Transformer(cfg)
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0].pow(2).mean(-1).sqrt()))
    model(torch.randint(0, 2048, (2, 16)))
    normed = [bool(torch.allclose(rms, torch.ones_like(rms), atol=1e-3)) for rms in inputs]
    assert normed == ([True] * cfg.n_layers if position == "post" else [False] * cfg.n_layers)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())

"""data.document_mask: each token of a packed window sees only its own document, at positions from 0, so its
logits equal those of its document run alone; refused where it is not built (encoder-decoder, model.hf_config)."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import REPO

from dist_train.config import ConfigError, ModelConfig, load_config
from dist_train.model import document_mask
from dist_train.model.decoder import Transformer
from dist_train.model.document_mask import DocumentMask, block_causal_mask, document_ids, document_positions

TINY = REPO / "configs" / "tiny.yaml"
EOS = 0
DOCUMENTS = ([5, 9, 3, EOS], [7, 2, 8, 6, EOS], [EOS], [4, 11, EOS], [3, 10, 12])
"""One packed window of 16 tokens: a document ends at each EOS (one is an EOS alone), the last runs on past it."""


def model_config(**overrides: object) -> ModelConfig:
    shape = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=16, seq_len=16)
    return ModelConfig(**{**shape, **overrides})


def packed_window() -> torch.Tensor:
    return torch.tensor([[t for doc in DOCUMENTS for t in doc]])  # (1, 16)


def alone_logits(model: Transformer) -> torch.Tensor:
    """The logits of each document run by itself from position 0, concatenated as in the window: (1, 16, V)."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([doc])) for doc in DOCUMENTS], dim=1)


def masked_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    document_mask.enable(model, EOS)
    return model


def test_document_ids_positions_and_mask_split_the_window_after_each_eos():
    ids = torch.tensor([[5, EOS, 7, 2, EOS, EOS, 4]])
    doc = document_ids(ids, EOS)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3]]  # an EOS belongs to the document it ends
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    allowed = block_causal_mask(doc)[0, 0].int().tolist()
    assert allowed[4] == [0, 0, 1, 1, 1, 0, 0]  # the second EOS sees its own document only
    assert allowed[6] == [0, 0, 0, 0, 0, 0, 1]
    assert allowed[1] == [1, 1, 0, 0, 0, 0, 0]  # causal inside a document


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_each_token_of_a_packed_window_gets_the_logits_of_its_document_run_alone(pos):
    model = masked_model(model_config(pos=pos))
    with torch.no_grad():
        masked = model(packed_window())
    alone = alone_logits(model)
    torch.testing.assert_close(masked, alone, rtol=0, atol=1e-5)
    model.document_mask = None  # the plain causal mask: later documents see the earlier ones
    with torch.no_grad():
        plain = model(packed_window())
    assert (plain - alone).abs().amax() > 1e-2
    torch.testing.assert_close(plain[:, :4], alone[:, :4], rtol=0, atol=1e-5)  # the first document is the same


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_both_attention_kernels_mask_per_document(attention):
    model = masked_model(model_config(attention=attention))
    with torch.no_grad():
        masked = model(packed_window())
    torch.testing.assert_close(masked, alone_logits(model), rtol=0, atol=1e-5)


def test_grad_checkpointing_gives_the_same_loss_and_gradients_under_the_mask():
    window = packed_window()
    labels = torch.roll(window, -1, dims=1)
    results = []
    for recompute in (False, True):
        model = masked_model(model_config(grad_checkpointing=recompute)).train()
        loss = model(window, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    model.document_mask = None
    assert abs(model(window, labels).item() - loss_b.item()) > 1e-3  # the mask changes the loss


def test_document_mask_with_an_encoder_decoder_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.document_mask=true", "model.arch=encoder_decoder", "model.pos=relative"])
    assert "data.document_mask with model.arch=encoder_decoder" in str(e.value)
    assert "data.document_mask" in e.value.keys


def test_document_mask_with_an_hf_config_is_refused_naming_the_key(tmp_path):
    hf = tmp_path / "config.json"
    hf.write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.document_mask=true", f"model.hf_config={hf}"])
    assert "data.document_mask with model.hf_config" in str(e.value)


@pytest.mark.slow
def test_compiled_model_masks_per_document_like_the_eager_one():
    model = masked_model(model_config())
    compiled = torch.compile(model)  # the mask is built inside the traced forward (~30 s to compile on the CPU)
    with torch.no_grad():
        masked = compiled(packed_window())
    torch.testing.assert_close(masked, alone_logits(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# FlexAttention (the CUDA kernel of the mask): its block mask and wiring, checked through the CPU forward.

def test_flex_block_mask_skips_the_blocks_between_documents_and_keeps_the_rule():
    from torch.nn.attention.flex_attention import create_block_mask

    from dist_train.model.flex_kernel import document_block_mask

    doc = torch.tensor([[0] * 256 + [1] * 256])  # two documents over four 128-token blocks
    block_mask = document_block_mask(doc)
    dense = block_mask.to_dense()[0, 0]  # (4, 4): which blocks the kernel computes
    assert dense.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    causal = create_block_mask(lambda b, h, q, kv: kv <= q, 1, None, 512, 512, device="cpu").to_dense()[0, 0]
    assert int(dense.sum()) < int(causal.sum()) == 10  # the causal triangle's blocks that span two documents go


FLEX_SHAPE = dict(d_model=64, d_ff=128)
"""Heads of 16: torch's compiled FlexAttention refuses narrower ones on CUDA."""


def flex_model(flex: str = "always", **overrides: object) -> Transformer:
    """The masked model with the block mask built where `flex` says (always: also on the CPU, forward only)."""
    model = masked_model(model_config(**FLEX_SHAPE, **overrides))
    model.document_mask = DocumentMask(EOS, flex=flex)
    return model


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_flex_kernel_gives_each_token_the_logits_of_its_document_run_alone(pos):
    model = flex_model(pos=pos)
    with torch.no_grad():
        assert type(model.document_mask.layout(packed_window()).mask).__name__ == "BlockMask"
        masked = model(packed_window())  # FlexAttention's CPU forward: its reference form, the same rule
    torch.testing.assert_close(masked, alone_logits(model), rtol=0, atol=1e-5)


def test_flex_kernel_model_traces_as_one_graph_with_its_block_mask():
    """train.compile: the block mask is built inside the traced forward without a graph break (fullgraph). The
    aot_eager backend traces as inductor does but runs the reference kernel (inductor has no CPU flex kernel for
    this shape; on CUDA the GPU check compiles it)."""
    model = flex_model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        masked = compiled(packed_window())
    torch.testing.assert_close(masked, alone_logits(model), rtol=0, atol=1e-5)


def test_flex_kernel_has_no_cpu_backward_so_training_there_is_refused(shard_dir):
    from dist_train.train.preflight import preflight

    model = flex_model().train()
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        model(packed_window(), torch.roll(packed_window(), -1, dims=1))
    cfg = load_config(TINY, [f"data.path={shard_dir}", "data.document_mask=true", "model.attention=flex"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.attention=flex needs a CUDA GPU"):
            preflight(cfg, world_size=1)


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=flex"], "model.attention=flex runs the document mask"),
    (["model.attention=flex", "data.document_mask=true", "model.dropout=0.1"],
     "FlexAttention has no attention dropout"),
    (["model.attention=flex", "data.document_mask=true", "model.n_heads=16", "model.n_kv_heads=4"],
     "model.attention=flex with heads of 8"),
])
def test_flex_kernel_without_the_document_mask_with_dropout_or_narrow_heads_is_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value) and "model.attention" in e.value.keys


def test_auto_kernel_builds_the_block_mask_on_cuda_only_without_dropout_and_for_heads_of_16():
    from dist_train.model.flex_kernel import flex_policy

    assert flex_policy(model_config(**FLEX_SHAPE)) == "cuda" == flex_policy(model_config(**FLEX_SHAPE,
                                                                                         attention="flex"))
    assert flex_policy(model_config(**FLEX_SHAPE, dropout=0.1)) == "never"
    assert flex_policy(model_config(**FLEX_SHAPE, attention="sdpa")) == "never"
    assert flex_policy(model_config()) == "never"  # heads of 8
    model = masked_model(model_config(**FLEX_SHAPE))  # document_mask.enable: from the config
    assert model.document_mask.flex == "cuda"
    with torch.no_grad():  # on the CPU a "cuda" policy builds the dense mask (evaluating a flex-trained run)
        assert model.document_mask.layout(packed_window()).mask.dtype == torch.bool


def _flex_and_dense_runs(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Logits and gradients of one CUDA model (heads of 16, 512 tokens, a document every ~97) on the compiled
    FlexAttention kernel, on SDPA with the dense mask, and with no mask. The loss projects the logits on fixed
    random directions, so every gradient is of order one."""
    ids = torch.randint(1, 64, (2, 512), generator=torch.Generator().manual_seed(0))
    ids[:, ::97] = EOS
    ids = ids.cuda()
    directions = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(1)).cuda()
    runs = {}
    for name, mask in (("flex", DocumentMask(EOS, flex="cuda")), ("dense", DocumentMask(EOS)), ("plain", None)):
        model = masked_model(model_config(**FLEX_SHAPE, seq_len=512, vocab_size=64)).cuda().to(dtype).train()
        model.document_mask = mask
        logits = model(ids)
        (logits.float() * directions).sum().backward()
        runs[name] = (logits.detach().float(), [p.grad.float() for p in model.parameters()])
    return runs


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cuda_flex_kernel_gives_the_dense_masks_logits_and_gradients(dtype, tolerance):
    """The compiled FlexAttention kernel against SDPA with the dense boolean mask, forward and backward, each
    tensor within `tolerance` in relative norm; the unmasked model must be well beyond it."""
    runs = _flex_and_dense_runs(dtype)
    (flex, flex_grads), (dense, dense_grads), (plain, plain_grads) = runs["flex"], runs["dense"], runs["plain"]
    gaps = [relative_gap(flex, dense)] + [relative_gap(a, b) for a, b in zip(flex_grads, dense_grads)]
    controls = [relative_gap(plain, dense)] + [relative_gap(a, b) for a, b in zip(plain_grads, dense_grads)]
    print(f"{dtype}: flex against dense, worst relative gap {max(gaps):.2e} (logits {gaps[0]:.2e}); unmasked "
          f"against dense: logits {controls[0]:.2e}, smallest over tensors {min(controls):.2e}")
    assert max(gaps) < tolerance
    assert controls[0] > 5 * tolerance and max(controls) > 10 * tolerance  # on the CPU: 0.19 and 0.87

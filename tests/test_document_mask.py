"""data.document_mask: each token of a packed window sees only its own document, at positions from 0, so its
logits equal those of its document run alone; refused where it is not built (encoder-decoder, model.hf_config)."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import REPO

from dist_train.config import ConfigError, ModelConfig, load_config
from dist_train.model import document_mask
from dist_train.model.decoder import Transformer
from dist_train.model.document_mask import block_causal_mask, document_ids, document_positions

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

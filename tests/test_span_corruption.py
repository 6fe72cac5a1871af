"""T5 span corruption over the real shard folder (session `shard_dir`, a 2,048-token BPE whose EOS is id 0)."""

from __future__ import annotations

import numpy as np
import pytest
from distributed_helpers import REPO

from dist_train.config import ConfigError, load_config
from dist_train.data.span_corruption import SpanCorruptionLoader, span_lengths
from dist_train.train.preflight import preflight

TOKENIZER_VOCAB = 2048
MODEL_VOCAB = 2112
SEQ = 128


def loader(shard_dir, micro=4, rank=0, world=1, seed=0, split="train", **kw) -> SpanCorruptionLoader:
    return SpanCorruptionLoader([(str(shard_dir), 1.0)], split, SEQ, MODEL_VOCAB, micro, rank, world, seed, **kw)


def uncorrupt(inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The raw window back: each sentinel of the input replaced by the tokens after that sentinel in the labels."""
    assert inputs[-1] == labels[-1] == 0  # both end with EOS
    spans: dict[int, list[int]] = {}
    current = None
    for token in labels[:-1].tolist():
        if token >= TOKENIZER_VOCAB:
            assert token not in spans, "a sentinel appears twice in the labels"
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out: list[int] = []
    for token in inputs[:-1].tolist():
        out += spans.pop(token) if token >= TOKENIZER_VOCAB else [token]
    assert not spans, "a labelled span has no sentinel in the input"
    return np.array(out)


def test_lengths_follow_t5_and_fill_seq_len():
    lengths = span_lengths(SEQ, 0.15, 3.0)
    assert lengths.encoder <= SEQ < span_lengths(SEQ + 1, 0.15, 3.0).raw + 1
    assert lengths.encoder == lengths.raw - lengths.noise + lengths.spans + 1
    assert lengths.decoder == lengths.noise + lengths.spans + 1
    assert lengths.noise == round(0.15 * lengths.raw) and lengths.spans == round(lengths.noise / 3.0)
    # T5's own figures for 512 encoder tokens (t5.data.preprocessors.random_spans_helper): 568 raw, 114 targets.
    t5 = span_lengths(512, 0.15, 3.0)
    assert (t5.raw, t5.decoder) == (568, 114)


def test_noise_density_within_one_percent_and_every_masked_token_once_in_the_targets(shard_dir):
    data = loader(shard_dir)
    masked = raw = 0
    for g in range(10_000):
        inputs, decoder_inputs, labels = data.example(g)
        window = data.windows.window(g)
        # Putting each labelled span back in place of its sentinel gives the window exactly: every masked token
        # is in the targets once, in order, and every kept token is in the input once.
        assert np.array_equal(uncorrupt(inputs, labels), window)
        assert decoder_inputs[0] == data.decoder_start_token_id and np.array_equal(decoder_inputs[1:], labels[:-1])
        masked += int((labels < TOKENIZER_VOCAB).sum()) - 1  # minus EOS
        raw += len(window)
    density = masked / raw
    print(f"noise density over 10,000 examples: {density:.5f} (target 0.15)")
    assert abs(density - 0.15) / 0.15 < 0.01  # T5 rounds round(141 * 0.15) = 21 masked of 141: 0.1489


def test_sentinels_are_above_every_token_id_and_numbered_from_the_top(shard_dir):
    data = loader(shard_dir)
    lengths = data.lengths
    real = np.concatenate([data.windows.window(g) for g in range(2_000)])
    assert real.max() < TOKENIZER_VOCAB  # the tokenizer's ids ...
    for g in range(200):
        inputs, _, labels = data.example(g)
        sentinels = inputs[inputs >= TOKENIZER_VOCAB]
        # ... never reach the sentinels, which count down from the top of the model's vocabulary.
        assert sentinels.tolist() == [MODEL_VOCAB - 1 - k for k in range(lengths.spans)]
        assert labels[labels >= TOKENIZER_VOCAB].tolist() == sentinels.tolist()
        assert (len(inputs), len(labels)) == (lengths.encoder, lengths.decoder)


def test_batches_depend_on_the_global_position_only_and_resume(shard_dir):
    one = loader(shard_dir, micro=4)
    two = [loader(shard_dir, micro=2, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch()
        halves = [part.next_batch() for part in two]
        for k in range(3):
            assert np.array_equal(whole[k].numpy(), np.concatenate([h[k].numpy() for h in halves]))
    resumed = loader(shard_dir, micro=4)
    resumed.load_state_dict(one.state_dict())
    later = one.next_batch()
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(resumed.next_batch(), later))
    with pytest.raises(ValueError, match="noise_density changed"):
        loader(shard_dir, noise_density=0.3).load_state_dict(one.state_dict())
    assert not np.array_equal(loader(shard_dir, seed=1).next_batch()[0], loader(shard_dir).next_batch()[0])


def test_vocabulary_without_room_for_the_sentinels_is_refused(shard_dir):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={shard_dir}", "model.arch=encoder_decoder",
                                                      "model.vocab_size=2050"])
    with pytest.raises(ConfigError, match=r"no room for the \d+ span-corruption sentinels.*vocab_size >= 20"):
        preflight(cfg, world_size=1)
    with pytest.raises(ValueError, match="no room"):
        SpanCorruptionLoader([(str(shard_dir), 1.0)], "train", SEQ, 2050, 1, 0, 1, 0)

"""T5 span corruption (Raffel et al. 2020, section 3.1.4) computed at load time from the decoder loader's windows.

Lengths. Every example is cut from a raw window of `raw` tokens, where `raw` is the longest window whose
corrupted input fits `model.seq_len` (T5's `compute_input_and_target_lengths`):

    noise   = round(raw · noise_density)                 masked tokens (at least 1, at most raw - 1)
    spans   = round(noise / mean_noise_span_length)      masked spans (at least 1)
    encoder = raw - noise + spans + 1  <= seq_len        kept tokens, one sentinel per span, EOS
    decoder = noise + spans + 1                          one sentinel per span, the masked tokens, EOS

so every example has the same encoder and decoder lengths and nothing is padded. Sentinel k (k < spans) is id
`vocab_size - 1 - k`: the top of the model's vocabulary, above every id the tokenizer makes (preflight refuses
a vocabulary without room for them).

One example. The window alternates kept and masked spans, starting with a kept one (T5's
`random_spans_noise_mask`): the kept tokens are cut into `spans` non-empty runs and the masked tokens into
`spans` non-empty runs, each uniformly at random. Then

    encoder input   kept_0 <s_0> kept_1 <s_1> ... kept_{n-1} <s_{n-1}> EOS
    labels          <s_0> masked_0 <s_1> masked_1 ... <s_{n-1}> masked_{n-1} EOS
    decoder input   START + labels[:-1]          (START = the EOS id, as BART's decoder_start_token_id)

Determinism. The window of global sample g is the `TokenLoader`'s (seeded order, ranks, mixture, epochs), and the
span layout of g comes from a generator seeded by (seed, g, split): a batch depends only on (seed, step, rank,
world size), and the loader's state is the TokenLoader's global position plus the corruption settings, so a
resumed run (also on another world size) reads the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_train.data.loader import TokenLoader

_SPLIT_TAGS = {"train": 0x7370616E, "val": 0x7370616F}


@dataclass(frozen=True)
class SpanLengths:
    raw: int
    """Tokens of the raw window one example is cut from."""
    noise: int
    """Masked tokens per example."""
    spans: int
    """Masked spans per example (= sentinels used)."""
    encoder: int
    """Encoder input tokens per example (<= seq_len)."""
    decoder: int
    """Decoder input tokens (= labels) per example."""


def _lengths_of(raw: int, noise_density: float, mean_span: float) -> SpanLengths:
    noise = min(max(int(round(raw * noise_density)), 1), raw - 1)
    spans = min(max(int(round(noise / mean_span)), 1), raw - noise)  # every masked span follows a kept one
    return SpanLengths(raw=raw, noise=noise, spans=spans, encoder=raw - noise + spans + 1, decoder=noise + spans + 1)


def span_lengths(seq_len: int, noise_density: float, mean_noise_span_length: float) -> SpanLengths:
    """The longest raw window whose corrupted encoder input fits seq_len tokens (see the module docstring)."""
    if seq_len < 3:
        raise ValueError(f"model.seq_len must be >= 3 for span corruption (a kept token, a sentinel, EOS), "
                         f"got {seq_len}")
    raw = 2
    while _lengths_of(raw + 1, noise_density, mean_noise_span_length).encoder <= seq_len:
        raw += 1
    return _lengths_of(raw, noise_density, mean_noise_span_length)


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items cut into `parts` non-empty runs, every such cut equally likely: their lengths."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [total])))


def noise_mask(lengths: SpanLengths, rng: np.random.Generator) -> np.ndarray:
    """Bool (raw,): True where a token is masked; kept and masked spans alternate, a kept one first."""
    kept = _segment(lengths.raw - lengths.noise, lengths.spans, rng)
    masked = _segment(lengths.noise, lengths.spans, rng)
    runs = np.stack([kept, masked], axis=1).reshape(-1)  # kept_0, masked_0, kept_1, ...
    return np.repeat(np.tile([False, True], lengths.spans), runs)


def corrupt(window: np.ndarray, mask: np.ndarray, vocab_size: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, labels) of one window: each masked span is replaced by its sentinel in the input and
    listed after it in the labels."""
    starts = mask & ~np.concatenate(([False], mask[:-1]))  # first token of each masked span
    sentinel = vocab_size - np.cumsum(starts)  # span k (0-based) -> vocab_size - 1 - k
    # Input: kept tokens, and the sentinel in place of each span's first masked token.
    keep_in = ~mask | starts
    inputs = np.where(starts, sentinel, window)[keep_in]
    # Labels: the sentinel before each span, then its tokens.
    span_tokens = window[mask]
    label_starts = starts[mask]
    labels = np.empty(len(span_tokens) + int(label_starts.sum()), dtype=np.int64)
    positions = np.arange(len(span_tokens)) + np.cumsum(label_starts)  # each token after the sentinels so far
    labels[positions] = span_tokens
    sentinel_slots = positions[label_starts] - 1
    labels[sentinel_slots] = sentinel[mask][label_starts]
    return np.append(inputs, eos), np.append(labels, eos)


class SpanCorruptionLoader:
    """(encoder input (B, Le), decoder input (B, Ld), labels (B, Ld)) micro-batches for one rank, int64."""

    def __init__(self, sources: list[tuple[str, float]], split: str, seq_len: int, vocab_size: int,
                 micro_batch_size: int, rank: int, world_size: int, seed: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, *, verify_checksums: bool = False) -> None:
        self.lengths = span_lengths(seq_len, noise_density, mean_noise_span_length)
        self.windows = TokenLoader(sources, split, self.lengths.raw - 1, micro_batch_size, rank, world_size, seed,
                                   verify_checksums=verify_checksums)
        if vocab_size - self.lengths.spans < self.windows.vocab_size:
            raise ValueError(sentinel_room_message(vocab_size, self.windows.vocab_size, self.lengths.spans))
        self.vocab_size, self.seed, self.split = vocab_size, seed, split
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size

    @property
    def eos_token_id(self) -> int:
        return self.windows.eos_token_id

    @property
    def decoder_start_token_id(self) -> int:
        return self.windows.eos_token_id

    def example(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample g: (encoder input, decoder input, labels)."""
        rng = np.random.default_rng([self.seed, g, _SPLIT_TAGS[self.split]])
        inputs, labels = corrupt(self.windows.window(g), noise_mask(self.lengths, rng), self.vocab_size,
                                 self.eos_token_id)
        return inputs, np.concatenate(([self.decoder_start_token_id], labels[:-1])), labels

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = self.windows.consumed + self.rank * self.micro_batch_size
        examples = [self.example(first + j) for j in range(self.micro_batch_size)]
        self.windows.consumed += self.world_size * self.micro_batch_size
        return tuple(torch.from_numpy(np.stack(column)) for column in zip(*examples))  # 3 x (B, L)

    def reset(self) -> None:
        self.windows.reset()

    def state_dict(self) -> dict:
        return {**self.windows.state_dict(), "objective": "span_corruption", "vocab_size": self.vocab_size,
                "noise_density": self.noise_density, "mean_noise_span_length": self.mean_noise_span_length}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position; refuse (if `strict`) when the corruption would differ."""
        if strict:
            mine = self.state_dict()
            changed = [k for k in ("objective", "vocab_size", "noise_density", "mean_noise_span_length")
                       if state.get(k) != mine[k]]
            if changed:
                raise ValueError(f"cannot resume the data loader: {', '.join(changed)} changed since the "
                                 f"checkpoint, so the examples differ; restore them or start a new run")
        self.windows.load_state_dict(state, strict)


def sentinel_room_message(model_vocab: int, tokenizer_vocab: int, spans: int) -> str:
    return (f"model.vocab_size ({model_vocab}) leaves no room for the {spans} span-corruption sentinels above the "
            f"tokenizer's {tokenizer_vocab} ids (sentinels are ids {model_vocab - spans}..{model_vocab - 1}); set "
            f"model.vocab_size >= {tokenizer_vocab + spans}, e.g. {-(-(tokenizer_vocab + spans) // 64) * 64}")

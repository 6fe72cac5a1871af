"""Training data: (seq_len + 1)-token windows read from memory-mapped shards, mixed by weight.

Sources. Each source is a shard folder made by `python -m data_prep.shard` (see `data_prep.manifest`);
its split is one token stream, the concatenation of its shards. Sample i of a source is the window
tokens[i·seq_len : i·seq_len + seq_len + 1], for i < n = (num_tokens - 1) // seq_len; inputs are its
first seq_len tokens and targets the last seq_len (shifted by one). Windows cross document (EOS) and
shard boundaries; the last < seq_len tokens of a split are never read.

The global sample stream (the same on every rank, fixed by `seed`):
1. Mixture. Global sample g belongs to block b = g // B (B = `MIX_BLOCK` = 1024, or S² for S > 32
   sources). Every source but the heaviest gets floor(w·B·(b+1)) - floor(w·B·b) of the block's B
   positions, the heaviest the rest, so after any number of blocks each source's share is its
   weight to within one sample; the positions are shuffled within the block (seeded by seed, b).
   The k-th position of source s in the stream takes that source's k-th sample.
2. Order. A source's k-th sample is sample perm_e(k mod n) of epoch e = k // n, where perm_e is a
   random-access pseudo-random permutation of range(n) (a Feistel network keyed by seed, source, e).
   Every sample is read once per epoch; a small source is repeated (new order each epoch) while a
   large one is still in its first.
3. Ranks. Micro-batch number t of rank r holds global samples
        consumed + r·micro_batch_size + j,   j < micro_batch_size,
   and every call advances `consumed` by world_size·micro_batch_size on every rank. So within a
   step ranks never share a sample, and an optimizer step of global batch G = micro × accum × world
   reads exactly the global samples [step·G, (step+1)·G).

State. `state_dict()` is {"consumed_samples", "seed", "seq_len", "split", "sources"} — a *global*
position, so a run resumed with another world size (or micro-batch / accumulation split) of the same
global batch reads the same samples in every step, and with any other global batch still continues
the stream without repeating or skipping a sample. Validation: a fresh loader (or `reset()`) gives the
same batches every time.

Integrity. At construction every shard's size is checked against its manifest (a missing or
truncated shard is refused with its path); `verify_checksums=True` also checks every sha256 (reads
all the data: do it once, e.g. `python -m data_prep.verify DIR`, not on every rank).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch

from dist_train.formats.manifest import DTYPES, SPLITS, ManifestError, check_shards, read_manifest

__all__ = ["MIX_BLOCK", "ManifestError", "TokenLoader", "read_manifest"]

MIX_BLOCK = 1024
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit integer hash (Steele et al.'s SplitMix64 finaliser): cheap, well mixed, portable."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    key = 0
    for part in parts:
        key = _splitmix64(key ^ (part & _MASK64))
    return key


class _Permutation:
    """A pseudo-random bijection of range(n) evaluated one index at a time, in O(1) memory.

    A 4-round Feistel network permutes range(2^bits) (bits even, 2^bits < 4n); indices that land
    outside range(n) are mapped again until they land inside ("cycle walking"), which keeps it a
    bijection of range(n). A 50 M-sample epoch needs no 400 MB permutation array per rank.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_key(key, r) for r in range(self.ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_splitmix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._feistel(i)
        while x >= self.n:
            x = self._feistel(x)
        return x


class _TokenStream:
    """One source's split: its shards as one token array, memory-mapped on first use."""

    def __init__(self, folder: Path, manifest: dict, split: str) -> None:
        shards = manifest["splits"][split]["shards"]
        self.paths = [folder / s["path"] for s in shards]
        self.starts = np.cumsum([0] + [s["num_tokens"] for s in shards]).tolist()
        self.num_tokens = self.starts[-1]
        self.dtype = DTYPES[manifest["dtype"]]
        self._maps: list[np.memmap | None] = [None] * len(shards)

    def _shard(self, k: int) -> np.memmap:
        if self._maps[k] is None:
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r")
        return self._maps[k]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        pieces = []
        k = bisect_right(self.starts, start) - 1
        while length > 0:
            offset = start - self.starts[k]
            piece = self._shard(k)[offset:offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            k += 1
        return np.concatenate(pieces).astype(np.int64)


class _Mixture:
    """Which source each global sample comes from, and its index within that source (see step 1)."""

    def __init__(self, weights: list[float], seed: int) -> None:
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.block = MIX_BLOCK if len(weights) <= 32 else len(weights) ** 2
        self.heaviest = max(range(len(weights)), key=lambda s: self.weights[s])
        self.seed = seed
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _before(self, b: int) -> list[int]:
        """Samples each source received in blocks [0, b)."""
        counts = [math.floor(w * self.block * b) for w in self.weights]
        counts[self.heaviest] = self.block * b - (sum(counts) - counts[self.heaviest])
        return counts

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != b:
            start, end = self._before(b), self._before(b + 1)
            sources = np.repeat(np.arange(len(self.weights)), [e - s for s, e in zip(start, end)])
            sources = np.random.default_rng([self.seed, b, 0x6D6978]).permutation(sources)
            index = np.empty(self.block, dtype=np.int64)
            for s in range(len(self.weights)):
                where = np.flatnonzero(sources == s)
                index[where] = start[s] + np.arange(len(where))
            self._cached = (b, sources, index)
        return self._cached[1], self._cached[2]

    def __call__(self, g: int) -> tuple[int, int]:
        if len(self.weights) == 1:
            return 0, g
        sources, index = self._layout(g // self.block)
        p = g % self.block
        return int(sources[p]), int(index[p])


def _check_sources(sources: list[tuple[str, float]], split: str, seq_len: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not sources:
        raise ValueError("no data sources: set data.path or data.sources")
    manifests = []
    for path, weight in sources:
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"data source {path}: weight must be a positive number, not {weight!r}")
        manifest = read_manifest(path)
        tokens = manifest["splits"][split]["num_tokens"]
        if tokens < seq_len + 1:
            fix = ("re-shard it with --val-fraction > 0" if split == "val" and tokens == 0
                   else "add data or lower model.seq_len")
            raise ValueError(f"data source {path}: the {split} split has {tokens} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}; {fix}")
        manifests.append(manifest)
    first = manifests[0]
    for (path, _), manifest in zip(sources[1:], manifests[1:]):
        for key in ("vocab_size", "eos_token_id"):
            if manifest[key] != first[key]:
                raise ValueError(f"data sources {sources[0][0]} and {path} were made with different "
                                 f"tokenizers ({key} {first[key]} vs {manifest[key]}); re-shard them with "
                                 f"one tokenizer")
        sha = (first.get("prep", {}).get("tokenizer_sha256"), manifest.get("prep", {}).get("tokenizer_sha256"))
        if None not in sha and sha[0] != sha[1]:
            raise ValueError(f"data sources {sources[0][0]} and {path} were made with different tokenizers "
                             f"({first['tokenizer']} vs {manifest['tokenizer']}); re-shard them with one")
    return manifests


class TokenLoader:
    """Deterministic (seq_len + 1)-token micro-batches for one rank (see the module docstring)."""

    def __init__(self, sources: list[tuple[str, float]], split: str, seq_len: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int, *, verify_checksums: bool = False) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, not {seq_len}, {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifests = _check_sources(sources, split, seq_len)
        for (path, _), manifest in zip(sources, self.manifests):
            check_shards(path, manifest, splits=(split,), checksums=verify_checksums)
        self.sources = [(str(path), float(weight)) for path, weight in sources]
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.streams = [_TokenStream(Path(path), m, split) for (path, _), m in zip(sources, self.manifests)]
        self.num_samples = [(s.num_tokens - 1) // seq_len for s in self.streams]
        self.mixture = _Mixture([w for _, w in self.sources], seed)
        self.consumed = 0
        self._perms: dict[tuple[int, int], _Permutation] = {}

    @property
    def vocab_size(self) -> int:
        return self.manifests[0]["vocab_size"]

    @property
    def eos_token_id(self) -> int:
        return self.manifests[0]["eos_token_id"]

    @property
    def tokenizer(self) -> str:
        return self.manifests[0]["tokenizer"]

    def sample_index(self, g: int) -> tuple[int, int]:
        """Global sample g → (source, sample number i within that source's split)."""
        source, k = self.mixture(g)
        n = self.num_samples[source]
        epoch = k // n
        if (source, epoch) not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[(source, epoch)] = _Permutation(n, _key(self.seed, source, epoch))
        return source, self._perms[(source, epoch)](k % n)

    def window(self, g: int) -> np.ndarray:
        """Global sample g's seq_len + 1 tokens (int64)."""
        source, i = self.sample_index(g)
        return self.streams[source].read(i * self.seq_len, self.seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: inputs and targets, int64 (micro_batch_size, seq_len)."""
        first = self.consumed + self.rank * self.micro_batch_size
        windows = torch.from_numpy(np.stack([self.window(first + j) for j in range(self.micro_batch_size)]))
        self.consumed += self.world_size * self.micro_batch_size
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T) each

    def reset(self) -> None:
        """Back to the first batch (validation reads the same batches every time)."""
        self.consumed = 0

    def state_dict(self) -> dict:
        """Small and JSON-serialisable: the global position plus what fixes the sample order."""
        return {"consumed_samples": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split,
                "sources": [{"path": path, "weight": weight, "num_tokens": stream.num_tokens}
                            for (path, weight), stream in zip(self.sources, self.streams)]}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position; refuse (if `strict`) when the data or order would differ.

        The world size and micro-batch size may differ from the saved run: the position is global.
        """
        if strict:
            mine = self.state_dict()
            changed = [k for k in ("seed", "seq_len", "split") if state.get(k) != mine[k]]
            saved = [(s["weight"], s["num_tokens"]) for s in state.get("sources", [])]
            if saved != [(s["weight"], s["num_tokens"]) for s in mine["sources"]]:
                changed.append("sources (their weights or token counts)")
            if changed:
                raise ValueError(f"cannot resume the data loader: {', '.join(changed)} changed since the "
                                 f"checkpoint, so the sample order differs; restore them, or start a new run "
                                 f"(load_state_dict(state, strict=False) keeps only the position)")
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"loader state has no valid consumed_samples: {consumed!r}")
        self.consumed = consumed

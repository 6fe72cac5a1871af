"""data.num_workers > 0 reads ahead in a thread without changing the batches or the saved position."""

from __future__ import annotations

import torch

from dist_train.data.loader import TokenLoader
from dist_train.data.prefetch import Prefetcher


def loader(shard_dir, rank: int = 1) -> TokenLoader:
    return TokenLoader([(str(shard_dir), 1.0)], "train", seq_len=64, micro_batch_size=4, rank=rank, world_size=2,
                       seed=7)


def test_prefetched_batches_and_positions_equal_the_plain_loaders(shard_dir):
    plain, ahead = loader(shard_dir), Prefetcher(loader(shard_dir), depth=4)
    for _ in range(20):
        x, y = plain.next_batch()
        px, py = ahead.next_batch()
        assert torch.equal(x, px) and torch.equal(y, py)
        assert ahead.state_dict() == plain.state_dict()  # the position of what was taken, not read ahead


def test_prefetcher_continues_from_a_resumed_position(shard_dir):
    first = loader(shard_dir)
    for _ in range(5):
        first.next_batch()
    resumed = loader(shard_dir)
    resumed.load_state_dict(first.state_dict())
    ahead = Prefetcher(resumed, depth=2)
    assert ahead.state_dict()["consumed_samples"] == 5 * 2 * 4
    assert torch.equal(ahead.next_batch()[0], first.next_batch()[0])

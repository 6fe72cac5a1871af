"""Process-group helpers under real processes (gloo on the CPU)."""

from __future__ import annotations

import time

import pytest
from distributed_helpers import run_distributed

COLLECTIVE_TIMEOUT_S = 2.0


def _rank0_works_longer_than_the_collective_timeout(rank: int, world_size: int) -> float:
    from dist_train.distributed.environment import discover
    from dist_train.distributed.rank0 import Rank0

    start = time.monotonic()
    Rank0(discover()).run_while_others_wait(time.sleep, 3 * COLLECTIVE_TIMEOUT_S)  # e.g. a universal conversion
    return time.monotonic() - start


@pytest.mark.slow
def test_other_ranks_wait_for_rank0_work_longer_than_the_collective_timeout() -> None:
    """The process group's collectives time out after 2 s here; rank 0's file work takes 6 s, and rank 1 waits
    for it instead of failing (a universal conversion of a large model outlasts the 30-minute timeout)."""
    waited0, waited1 = run_distributed(_rank0_works_longer_than_the_collective_timeout, 2,
                                       collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    print(f"rank 0 worked {waited0:.1f} s, rank 1 waited {waited1:.1f} s")
    assert waited1 >= 3 * COLLECTIVE_TIMEOUT_S - 0.5

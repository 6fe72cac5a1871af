"""The RNG states (Python, NumPy, torch CPU and CUDA) of a rank: seeded per rank, saved in its client file and
restored on resume.

Every data-parallel rank draws its own dropout masks: the streams are seeded from (train.seed, step, rank) by
`seed_rank_streams`, on a fresh start (step 0) and on a resume at another world size (the resumed step, since the
old ranks' saved states do not map to the new ranks). A resume at the same world size restores each rank's saved
states instead, so it continues bit-identically. The model's initial weights come from train.seed alone, the same
on every rank, before the streams are split.

Saved as JSON-able values (Python's and NumPy's Mersenne Twister states as lists of ints) plus tensors (torch's
byte states), so the client file holds no pickled objects. `set_rng_state` also takes the tuples and NumPy
arrays of client files written before that format.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The 64-bit seed of `rank`'s streams from optimizer step `step` on, hashed from all three by NumPy's
    SeedSequence: distinct for every (seed, step, rank) in practice, at any number of ranks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def seed_rank_streams(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) for this rank (see the module docstring)."""
    s = rank_seed(seed, step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)  # NumPy's legacy seed takes 32 bits
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """{python, numpy}: JSON-able; {torch, cuda}: byte tensors."""
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(mt), gauss],
             "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(),
                                                "pos": int(numpy_state["state"]["pos"])}},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)  # a dict, or the legacy tuple of older client files
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

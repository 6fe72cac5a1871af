"""Each rank's client file `client_rank{r:05d}.pt`: its loader position and RNG states.

Written as JSON plus tensors: `{"format": 2, "json": "<loader, world size, Python and NumPy RNG states>",
"tensors": {"torch": ..., "cuda": [...]}}`, which torch's weights_only unpickler reads with no allowlisted global
at all. Files of the earlier format (a pickled dict holding NumPy arrays and tuples) load through the same
`safe_load`, with NumPy's three array globals allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from dist_train.checkpoint.rng import rng_state
from dist_train.checkpoint.safe_load import safe_load

FORMAT = 2


def client_file(folder: Path, rank: int) -> Path:
    return folder / f"client_rank{rank:05d}.pt"


def client_payload(loader_state: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What `torch.save` writes to this rank's client file: the loader state and the current RNG states."""
    rng = rng_state()
    tensors = {key: rng.pop(key) for key in ("torch", "cuda") if key in rng}
    text = json.dumps({"loader": loader_state, "world_size": world_size, "rng": rng})
    return {"format": FORMAT, "json": text, "tensors": tensors}


def load_client_file(path: Path, trust: bool = False) -> dict[str, Any]:
    """{loader, world_size, rng} of a client file of either format, read with `safe_load`."""
    raw = safe_load(path, map_location="cpu", trust=trust)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        return raw  # the earlier format already has this shape
    client = json.loads(raw["json"])
    client["rng"].update(raw["tensors"])
    return client

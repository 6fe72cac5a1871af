"""What fixes a run's training sample stream, so that a resume can refuse to change it before launch.

A checkpoint holds only a position in the stream (`consumed_samples`, see `dist_train.data.loader`): the
samples before and after it are those of the same seed (their order), seq_len (their cut) and data (the
folders and their mixture weights). Changing any of them would repeat some samples and skip others; the
loader refuses that too, but only once the engine is built. A data folder moved or copied elsewhere is
the same data when its manifest lists the same shards (sizes and sha256s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.config import Config
from dist_train.formats.manifest import SPLITS, read_manifest


def stream_changes(old: dict[str, Any], cfg: Config) -> list[str]:
    """The changes from the checkpoint's config `old` to `cfg` that break its sample stream, each as
    `key: old -> new` (with why, for the data)."""
    changes = [f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {new!r}"
               for section, key, new in (("train", "seed", cfg.train.seed), ("model", "seq_len", cfg.model.seq_len))
               if old.get(section, {}).get(key) != new]
    before, after = _weighted_paths(old.get("data", {})), cfg.data.weighted_paths()
    key = "data.path" if cfg.data.path and len(before) == 1 else "data.sources"
    if [w for _, w in before] != [w for _, w in after]:
        return [*changes, f"{key}: {before} -> {after} (another mixture of sources)"]
    for (old_path, _), (new_path, _) in zip(before, after):
        why = _other_data(old_path, new_path)
        if why:
            changes.append(f"{key}: {old_path!r} -> {new_path!r} ({why})")
    return changes


def _weighted_paths(data: dict[str, Any]) -> list[tuple[str, float]]:
    """`DataConfig.weighted_paths` of a saved config's `data` section."""
    if data.get("sources"):
        return [(s["path"], s.get("weight", 1.0)) for s in data["sources"]]
    return [(data["path"], 1.0)] if data.get("path") else []


def _other_data(old_path: str, new_path: str) -> str | None:
    """Why the folder `new_path` cannot stand in for `old_path`, or None when it holds the same shards."""
    if Path(old_path).resolve() == Path(new_path).resolve():
        return None
    try:
        new = read_manifest(new_path)
    except (OSError, ValueError):
        return None  # the data check before launch refuses it, saying what is missing
    try:
        old = read_manifest(old_path)
    except (OSError, ValueError):
        return (f"{old_path} no longer holds a shard folder, so nothing shows that {new_path} holds the same "
                f"data; if it is a moved copy, keep the old path with a symlink there to the copy")
    if _shards(old) != _shards(new):
        return "another dataset: its manifest lists other shards"
    return None


def _shards(manifest: dict[str, Any]) -> tuple[Any, ...]:
    return manifest["dtype"], [[(s["num_tokens"], s["sha256"]) for s in manifest["splits"][split]["shards"]]
                               for split in SPLITS]

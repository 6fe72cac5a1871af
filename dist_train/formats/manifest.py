"""`manifest.json`: the one description of a shard folder, shared by the writer and the training loader.

    {
      "vocab_size": 2048, "dtype": "uint16", "eos_token_id": 0, "tokenizer": "/abs/tok",
      "sources": [{"path": "/abs/corpus.jsonl", "format": "json", "bytes": 5334777, "mtime_ns": ...}],
      "splits": {
        "train": {"num_tokens": N, "num_documents": D,
                  "shards": [{"path": "train_00000.bin", "num_tokens": n, "sha256": "...",
                              "max_token_id": 2047}, ...]},
        "val":   {...}
      },
      "prep": {"text_field": "text", "sample_by": "line", "val_fraction": 0.05, "seed": 0,
               "shard_tokens": 100000000, "tokenizer_sha256": "..."}
    }

A shard is a flat little-endian array of `dtype` token ids: the split's documents in input order, each
followed by EOS, cut every `shard_tokens` tokens (a document may continue in the next shard). Shard
paths are relative to the folder. `max_token_id` is the shard's largest token id (absent from manifests
written before it was recorded). `prep` records the settings, so that re-running a command on a
folder can tell "same dataset" from "different dataset". The manifest is written last and atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from dist_train.formats.atomic_file import write_text_atomic
from dist_train.formats.errors import FormatError

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REBUILD = "rebuild the folder with `python -m data_prep.shard`"


class ManifestError(FormatError):
    """A manifest or shard that is missing, malformed, truncated or corrupted; the message names the file."""


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> str:
    """`uint16` when every token id fits (vocab ≤ 65,536), else `uint32`; refuse a dtype too small."""
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested not in DTYPES:
        raise FormatError(f"dtype must be auto, uint16 or uint32, not {requested!r}")
    if requested == "uint16" and not fits16:
        raise FormatError(f"a vocabulary of {vocab_size} tokens does not fit uint16 (ids up to 65535): "
                            f"use --dtype uint32 or --dtype auto")
    return requested


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename: readers see all or nothing."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def manifest_path(path: str | os.PathLike) -> Path:
    """`path` itself if it names a file, else `path/manifest.json`."""
    path = Path(path).expanduser()
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def _require(cond: bool, where: Path, key: str, what: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: `{key}` {what}; {_REBUILD}")


def _validate_split(split: dict, name: str, where: Path) -> None:
    key = f"splits.{name}"
    _require(isinstance(split, dict), where, key, "is missing or not an object")
    _require(isinstance(split.get("num_tokens"), int) and split["num_tokens"] >= 0, where,
             f"{key}.num_tokens", "must be a non-negative integer")
    _require(isinstance(split.get("shards"), list), where, f"{key}.shards", "must be a list")
    total = 0
    for i, shard in enumerate(split["shards"]):
        skey = f"{key}.shards[{i}]"
        _require(isinstance(shard, dict), where, skey, "must be an object")
        rel = shard.get("path")
        _require(isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts,
                 where, f"{skey}.path", "must be a path relative to the folder")
        _require(isinstance(shard.get("num_tokens"), int) and shard["num_tokens"] > 0, where,
                 f"{skey}.num_tokens", "must be a positive integer")
        _require(isinstance(shard.get("sha256"), str) and bool(_SHA256.match(shard["sha256"])), where,
                 f"{skey}.sha256", "must be 64 lowercase hex digits")
        max_id = shard.get("max_token_id", 0)
        _require(isinstance(max_id, int) and not isinstance(max_id, bool) and max_id >= 0, where,
                 f"{skey}.max_token_id", "must be a non-negative integer")
        total += shard["num_tokens"]
    _require(total == split["num_tokens"], where, f"{key}.num_tokens",
             f"is {split['num_tokens']} but its shards hold {total} tokens")


def validate_manifest(manifest: object, where: Path) -> dict:
    """Check every field the loader relies on; the error names the file and the key."""
    _require(isinstance(manifest, dict), where, "(top level)", "must be a JSON object")
    vocab = manifest.get("vocab_size")
    _require(isinstance(vocab, int) and vocab > 0, where, "vocab_size", "must be a positive integer")
    _require(manifest.get("dtype") in DTYPES, where, "dtype", f"must be one of {sorted(DTYPES)}")
    _require(manifest["dtype"] == "uint32" or vocab <= 65536, where, "dtype",
             f"uint16 cannot hold a vocabulary of {vocab} tokens")
    eos = manifest.get("eos_token_id")
    _require(isinstance(eos, int) and 0 <= eos < vocab, where, "eos_token_id",
             f"must be an integer in [0, {vocab})")
    _require(isinstance(manifest.get("tokenizer"), str), where, "tokenizer", "must be a path or name")
    _require(isinstance(manifest.get("sources"), list), where, "sources", "must be a list")
    _require(isinstance(manifest.get("splits"), dict), where, "splits", "must be an object")
    for name in SPLITS:
        _validate_split(manifest["splits"].get(name), name, where)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a shard folder's manifest (`path` is the folder or the manifest file)."""
    file = manifest_path(path)
    if not file.is_file():
        raise ManifestError(f"{file} does not exist: {path} is not a finished shard folder; "
                            f"make one with `python -m data_prep.shard --input ... --tokenizer ... --out ...`")
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{file} is not valid JSON ({err}); {_REBUILD}") from err
    return validate_manifest(manifest, file)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def check_shards(folder: str | os.PathLike, manifest: dict, splits: tuple[str, ...] = SPLITS,
                 checksums: bool = False) -> None:
    """Refuse a missing or wrong-sized shard (always) or one whose sha256 differs (`checksums=True`).

    The size check costs one `stat` per shard; the checksum reads every byte, so it is opt-in.
    """
    folder = Path(folder)
    itemsize = DTYPES[manifest["dtype"]].itemsize
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = folder / shard["path"]
            if not path.is_file():
                raise ManifestError(f"shard {path} is missing (listed in {folder / MANIFEST_NAME}); {_REBUILD}")
            expected = shard["num_tokens"] * itemsize
            size = path.stat().st_size
            if size != expected:
                what = "truncated" if size < expected else "too long"
                raise ManifestError(f"shard {path} is {what}: {size} bytes, the manifest says {expected} "
                                    f"({shard['num_tokens']} {manifest['dtype']} tokens); {_REBUILD}")
            if checksums and file_sha256(path) != shard["sha256"]:
                raise ManifestError(f"shard {path} is corrupted: its sha256 differs from the manifest's; "
                                    f"{_REBUILD}")


SPOT_TOKENS = 4096
"""Tokens read at the start, middle and end of a shard whose manifest records its largest id."""
_SCAN_TOKENS = 1 << 24  # 32-64 MiB per numpy max over the memory map


def _largest_id(path: Path, dtype: np.dtype, recorded: int | None) -> int:
    """A shard's largest token id as far as it can be known cheaply. With the id the writer recorded: that id,
    or a larger one found in three small reads (a shard replaced by another tokenizer's, or read with the wrong
    dtype, shows it in any of them). Without one (a manifest written before `max_token_id`): a full scan."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if recorded is None:
        return max(int(tokens[i:i + _SCAN_TOKENS].max()) for i in range(0, len(tokens), _SCAN_TOKENS))
    middle = max(0, len(tokens) // 2 - SPOT_TOKENS // 2)
    spots = (tokens[:SPOT_TOKENS], tokens[middle:middle + SPOT_TOKENS], tokens[-SPOT_TOKENS:])
    return max(recorded, *(int(spot.max()) for spot in spots))


def check_token_ids(folder: str | os.PathLike, manifest: dict, splits: tuple[str, ...] = SPLITS) -> None:
    """Refuse a shard holding a token id outside the manifest's vocabulary: the model would index its embedding
    table out of range mid-run (an IndexError on the CPU, a device-side assert on a GPU). Shard sizes must have
    been checked (`check_shards`)."""
    folder, vocab = Path(folder), manifest["vocab_size"]
    dtype = DTYPES[manifest["dtype"]]
    if vocab > np.iinfo(dtype).max:  # every id the dtype can hold is in the vocabulary
        return
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = folder / shard["path"]
            largest = _largest_id(path, dtype, shard.get("max_token_id"))
            if largest >= vocab:
                raise ManifestError(
                    f"shard {path} holds token id {largest}, outside the vocabulary of {vocab} ids (vocab_size in "
                    f"{folder / MANIFEST_NAME}): it was made by another tokenizer than {manifest['tokenizer']}, or "
                    f"its dtype is not {manifest['dtype']}; {_REBUILD} and the tokenizer the run trains with")

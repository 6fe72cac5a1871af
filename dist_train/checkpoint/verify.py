"""Checkpoint integrity: every file's size and sha256, listed when a checkpoint is published, checked before one
is loaded.

`files.json` in each `step_N/` lists `{relative path: {"bytes", "sha256"}}` for every file the save wrote
(client_state.json included); it is written before the rename that publishes the folder, so a published
checkpoint always has it. A check reads it back: sizes always (a truncated copy, a half-synced file system),
sha256 too with `checkpoint.verify=full` (bit rot, a flipped byte: reads every byte once). Files added after
publishing (`universal/`, made on a resume with another world size) are not listed and not checked.

A resume of `latest` that finds it corrupt moves it to `checkpoints/corrupt/` (kept for inspection, no longer seen
by `latest`, pruning or averaging) and falls back to the newest checkpoint that verifies; an explicit
`--resume PATH` that fails is refused (`CorruptCheckpoint`), and so is a checkpoint that export, evaluate or average
would read (`refuse_if_corrupt`; `--no-verify-hashes` checks the sizes only). Nothing that fails is ever loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dist_train.formats.atomic_file import write_text_atomic

FILES_LIST = "files.json"
CORRUPT_DIR = "corrupt"
_CHUNK_BYTES = 8 << 20
VerifyMode = Literal["full", "sizes"]


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files do not match the sizes or hashes written when it was saved."""


@dataclass(frozen=True)
class Problem:
    file: Path
    """The file that is missing, of the wrong size or with the wrong hash."""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    """One file's entry of files.json."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def write_files_list(folder: Path, known: dict[str, dict[str, Any]]) -> None:
    """List every file under `folder`: the entries of `known` (relative path -> entry, measured by the rank that
    wrote the file, in parallel) as they are, the other files measured here."""
    entries = {}
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != FILES_LIST:
                entries[rel] = known.get(rel) or describe(folder / rel)
    write_text_atomic(folder / FILES_LIST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1) + "\n")


def check(folder: Path, mode: VerifyMode = "full") -> Problem | None:
    """The first problem of `folder` against its files.json (sizes, and sha256 when `mode` is full), or None."""
    listing = folder / FILES_LIST
    if not folder.is_dir():
        return Problem(folder, "the checkpoint folder is missing")
    try:
        files = json.loads(listing.read_text())["files"]
    except FileNotFoundError:
        return Problem(listing, "missing: the checkpoint was not published by a complete save (or a copy of it "
                                "is incomplete), so its files cannot be checked")
    except (ValueError, KeyError, TypeError) as e:
        return Problem(listing, f"unreadable ({e})")
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return Problem(path, "missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            return Problem(path, f"{size:,} bytes, but {want['bytes']:,} were written (a truncated or "
                                 f"half-synced copy)")
    if mode == "full":
        for rel, want in files.items():
            if sha256_of(folder / rel) != want["sha256"]:
                return Problem(folder / rel, f"sha256 differs from the one written at save ({want['sha256'][:16]}"
                                             f"...): the bytes changed on disk (bit rot or a bad copy)")
    return None


def refuse_if_corrupt(folder: Path, mode: VerifyMode = "full") -> None:
    """Raise CorruptCheckpoint naming the first file of `folder` that fails `check`; nothing is moved (a tool that
    reads a checkpoint refuses it; only a resume sets `latest` aside)."""
    problem = check(folder, mode)
    if problem is not None:
        raise CorruptCheckpoint(f"refused, the checkpoint {folder} is corrupt: {problem}. Use another checkpoint, "
                                f"or put back an intact copy of this one")


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    """`--no-verify-hashes`, worded the same in every tool that reads checkpoints; sets `verify` to full or sizes."""
    parser.add_argument("--no-verify-hashes", dest="verify", action="store_const", const="sizes", default="full",
                        help="check the checkpoint's files against the sizes in its files.json but not their "
                             "sha256 (skips reading every byte once; misses bit rot)")


def quarantine(folder: Path, problem: Problem) -> Path:
    """Move a corrupt checkpoint to checkpoints/corrupt/ and say so loudly (stderr); return where it went."""
    aside = folder.parent / CORRUPT_DIR
    aside.mkdir(exist_ok=True)
    target, suffix = aside / folder.name, 1
    while target.exists():
        target, suffix = aside / f"{folder.name}.{suffix}", suffix + 1
    if folder.exists():
        os.rename(folder, target)
    bar = "!" * 100
    print(f"{bar}\nCORRUPT CHECKPOINT {folder.name}: {problem}\nmoved to {target}; it will not be loaded\n{bar}",
          file=sys.stderr, flush=True)
    return target

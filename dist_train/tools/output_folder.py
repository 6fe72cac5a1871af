"""Where `export` and `average` write: a new folder, or one the same tool wrote before; never anything else.

A tool writes into `OUT.tmp` and renames it to `OUT` once complete, so a kill never leaves a half folder under the
name users load. `--out` may name
- nothing yet, or an empty folder: written;
- a folder the same tool wrote: replaced. The tool's marker, `dist_train_output.json`, names the tool and lists
  every file it wrote, so a replace deletes exactly those files; a folder holding any other file (notes put
  beside an export) is refused, as a whole;
- anything else (a run folder, a checkpoint folder, a file, another tool's output, a user's folder): refused with
  `OutputFolderError`, naming the folder and what is in it, before anything is written or read.
`OUT.tmp` gets the marker before any other file, so one left by a killed run of the tool is recognised, said so
and removed; an `OUT.tmp` without the tool's marker is refused like `OUT`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = "dist_train_output.json"
_SHOWN = 6  # entries of a refused folder named in the message


class OutputFolderError(ValueError):
    """`--out` names something the tool must not replace; the message names it, what it holds and the fix."""


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _files(folder: Path) -> list[str]:
    """Every file and link below `folder` (not following links), relative to it, the marker excepted."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
        found += [os.path.relpath(os.path.join(root, d), folder) for d in dirs if os.path.islink(os.path.join(root, d))]
    return sorted(f for f in found if f != MARKER)


def _kind(folder: Path) -> str:
    if (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").exists():
        return "a run folder"
    if (folder / "client_state.json").exists() or any(folder.glob("*_model_states.pt")):
        return "a checkpoint folder"
    return "a folder"


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _refusal(folder: Path, tool: str) -> str | None:
    """Why `tool` may not replace `folder` (None: it may: absent, empty, or all of it written by `tool`)."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link (to {os.readlink(folder)}): name the folder itself"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return None
    marker = _read_marker(folder)
    if marker is None:
        return (f"{folder} is {_kind(folder)} that {tool} did not write (no {MARKER}); it holds "
                f"{_listing(entries)}")
    if marker.get("written_by") != tool:
        return f"{folder} holds the output of {marker.get('written_by')}, not of {tool}"
    foreign = sorted(set(_files(folder)) - set(marker.get("files", [])))
    if foreign:
        return f"{folder} holds files {tool} did not write: {_listing(foreign)}"
    return None


def _temporary(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def _check(folder: Path, tool: str, role: str) -> None:
    problem = _refusal(folder, tool)
    if problem is not None:
        raise OutputFolderError(f"{role}: {problem}. Nothing was written: give --out a new (or empty) folder, or "
                                f"one that {tool} wrote before (it is then replaced)")


def _left_by(folder: Path, tool: str) -> bool:
    """Whether `folder` is a temporary folder of `tool` (its marker, complete or not)."""
    marker = _read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    return marker is not None and marker.get("written_by") == tool


def check_output_folder(out: Path, tool: str) -> None:
    """Refuse (OutputFolderError) an `--out`, or an `OUT.tmp` beside it, that `tool` may not write or replace.
    Cheap: call it before reading anything."""
    out = Path(os.path.abspath(out))
    _check(out, tool, "--out")
    if not _left_by(_temporary(out), tool):
        _check(_temporary(out), tool, "the temporary folder of --out")


def _remove_own(folder: Path, tool: str) -> None:
    """Delete a folder `tool` wrote: the files its marker lists, the marker, then the emptied folders (rmdir, so a
    file that appeared meanwhile stops it)."""
    _check(folder, tool, "--out")  # again: time has passed since the first check
    if not folder.exists():
        return
    listed = set((_read_marker(folder) or {}).get("files", []))
    for name in listed & set(_files(folder)):  # never a listed name that is not below the folder ("../x")
        (folder / name).unlink()
    (folder / MARKER).unlink(missing_ok=True)
    for root, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):  # deepest first
        os.rmdir(root)


def _clear_temporary(tmp: Path, tool: str) -> None:
    """Remove an `OUT.tmp` that a killed run of `tool` left (its marker is written first), or an empty one."""
    if _left_by(tmp, tool):
        print(f"{tool}: removing {tmp}, left by an interrupted {tool}", file=sys.stderr)
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.rmdir()  # empty: check_output_folder refused anything else


def _write_marker(folder: Path, tool: str, files: list[str], complete: bool) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": tool, "complete": complete, "files": files}, indent=1)
                                 + "\n")


@contextlib.contextmanager
def output_folder(out: Path, tool: str) -> Iterator[Path]:
    """Yield an empty folder to write into (`OUT.tmp`); when the block ends without error, mark every file in it
    as written by `tool` and put it at `out` (replacing the previous output of `tool` there). An error removes
    the temporary folder and leaves `out` as it was."""
    out = Path(os.path.abspath(out))
    check_output_folder(out, tool)
    tmp = _temporary(out)
    _clear_temporary(tmp, tool)
    tmp.mkdir(parents=True)
    _write_marker(tmp, tool, [], complete=False)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_marker(tmp, tool, _files(tmp), complete=True)
    _remove_own(out, tool)
    os.rename(tmp, out)

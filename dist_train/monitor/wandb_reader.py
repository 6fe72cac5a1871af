"""Read W&B's local `.wandb` run files back, without the network: history, summary, run id and name.

wandb >= 0.19 ships no Python reader for these files, but the format is stable and small:

    header   7 bytes: b":W&B", uint16 0xBEE1 (little-endian), uint8 version 0
    blocks   32 KiB each; a block holds records `<crc32 u32><length u16><type u8><payload>`
             (type 1 a full record, 2/3/4 the first/middle/last piece of one split across blocks);
             a block tail shorter than a record header (7 bytes) is zero padding
    payload  one `wandb.proto.wandb_internal_pb2.Record` (protobuf): history rows, summary, run, ...

The checksum is zlib's crc32 of the type byte followed by the payload. A file cut short by a kill ends in an
incomplete record, which is dropped: everything before it is intact.

    python -m dist_train.monitor.wandb_reader RUN_DIR                 # the history of the run in RUN_DIR/wandb/
    python -m dist_train.monitor.wandb_reader RUN_DIR/wandb/offline-run-*/run-*.wandb --summary --json
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.config.quote import quote

MAGIC = b":W&B"
HEADER = struct.Struct("<4sHB")  # magic, 0xBEE1, version
BLOCK_BYTES = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, payload length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """A `.wandb` file that is not one, or whose records are corrupt (not merely cut short)."""


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The payload of every complete record in a `.wandb` file, in order."""
    data = Path(path).read_bytes()
    if data[:HEADER.size] != HEADER.pack(MAGIC, 0xBEE1, 0)[:len(data)]:
        raise WandbFileError(f"{path} is not a W&B run file (it starts {quote(data[:HEADER.size])}, not "
                             f":W&B and 0xBEE1)")
    if len(data) < HEADER.size:
        return  # killed before its header was written
    pos, pieces = HEADER.size, []
    while pos + RECORD_HEADER.size <= len(data):
        block_left = BLOCK_BYTES - pos % BLOCK_BYTES
        if block_left < RECORD_HEADER.size:
            pos += block_left  # padding at the end of a block
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        payload = data[start:start + length]
        if kind == 0 and length == 0:
            pos += block_left  # zeroed rest of the last block: a writer pre-allocated it
            continue
        if len(payload) < length:
            return  # the writer was killed mid-record
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise WandbFileError(f"{path}: record at byte {pos} fails its crc32 check (corrupt file)")
        pos = start + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pieces = [payload]
        elif kind == MIDDLE:
            pieces.append(payload)
        elif kind == LAST:
            yield b"".join([*pieces, payload])
            pieces = []
        else:
            raise WandbFileError(f"{path}: unknown record type {kind} at byte {pos}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every record of a `.wandb` file as W&B's own protobuf class (`wandb_internal_pb2.Record`)."""
    from wandb.proto import wandb_internal_pb2  # wandb is optional for the rest of dist_train

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    """History/summary/config items → {key: value}; nested keys are joined with '.'."""
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in items}


@dataclass
class RunFile:
    """What one `.wandb` file holds (one `wandb.init` of a run; a resumed run has one file per resume)."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    start_time: float = 0.0
    """Unix seconds of this file's `wandb.init` (orders the files of a resumed run)."""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per history row, with W&B's own `_step`, `_runtime` and `_timestamp`."""
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    """None when the process ended without `run.finish()` (killed)."""


def read_run_file(path: str | Path) -> RunFile:
    out = RunFile(Path(path))
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out.history.append(_items(record.history.item))
        elif kind == "run":
            run = record.run
            out.run_id, out.name, out.project = run.run_id, run.display_name, run.project
            out.start_time = run.start_time.seconds + run.start_time.nanos / 1e9
            out.tags = list(run.tags)
            out.config.update(_items(run.config.update))
        elif kind == "config":
            out.config.update(_items(record.config.update))
        elif kind == "summary":
            out.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                out.summary.pop(item.key or ".".join(item.nested_key), None)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def run_files(path: str | Path, run_id: str | None = None) -> list[Path]:
    """The `.wandb` files under `path` (a run folder, its `wandb/` folder, or one file), optionally only those
    of `run_id`, oldest first. Ordered by the time of their `wandb.init`, not by name: a resume within the
    same second gets a folder name that sorts before the first one."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        root = path / "wandb" if (path / "wandb").is_dir() else path
        # offline-run-DATE-ID/ and run-DATE-ID/ (online); not the latest-run symlink to one of them.
        files = sorted(f for f in root.glob("*run-*/run-*.wandb") if not f.parent.is_symlink())
    if run_id is not None:
        files = [f for f in files if f.name == f"run-{run_id}.wandb"]
    return sorted(files, key=_start_time)


def _start_time(path: Path) -> float:
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.start_time.seconds + record.run.start_time.nanos / 1e9
    return path.stat().st_mtime  # no run record: killed before its first flush, last written at its start


def read_history(path: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """All history rows of a run (every resume, oldest first) under `path`; see `run_files`."""
    return [row for f in run_files(path, run_id) for row in read_run_file(f).history]


def last_step(path: str | Path, run_id: str) -> int | None:
    """The highest `_step` W&B already holds for `run_id` under `path`, or None."""
    steps = [row["_step"] for row in read_history(path, run_id) if "_step" in row]
    return max(steps) if steps else None


def _format_row(row: dict[str, Any]) -> str:
    shown = {k: row[k] for k in sorted(row) if not k.startswith("_")}
    return f"step {row.get('_step')}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run folders, their wandb/ folders, or .wandb files")
    parser.add_argument("--run-id", help="only this W&B run id (default: every run found)")
    parser.add_argument("--summary", action="store_true", help="print the run summary instead of the history")
    parser.add_argument("--json", action="store_true", help="JSON lines (one per row, or one summary object)")
    args = parser.parse_args(argv)
    try:
        _print_runs(args)
    except (WandbFileError, OSError) as e:
        print(f"wandb_reader: {e}", file=sys.stderr)
        return 2
    return 0


def _print_runs(args: argparse.Namespace) -> None:
    files = [f for p in args.paths for f in run_files(p, args.run_id)]
    if not files:
        raise WandbFileError(f"no run-*.wandb files under {' '.join(args.paths)}"
                             f"{f' for run id {args.run_id}' if args.run_id else ''}: give a run folder, its wandb/ "
                             f"folder or a .wandb file")
    for f in sorted(files, key=_start_time):
        run = read_run_file(f)
        if args.summary:
            out = {"file": str(f), "run_id": run.run_id, "name": run.name, "summary": run.summary}
            print(json.dumps(out) if args.json else f"{f} ({run.run_id}, {run.name}): {run.summary}")
            continue
        if not args.json:
            print(f"# {f}: run {run.run_id} ({run.name}), {len(run.history)} rows")
        for row in run.history:
            print(json.dumps(row) if args.json else _format_row(row))


if __name__ == "__main__":
    raise SystemExit(main())

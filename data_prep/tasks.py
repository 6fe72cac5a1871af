"""One prep job split into N tasks (e.g. a SLURM array): which documents task I reads, and how.

The corpus is its inputs laid end to end, a line of B bytes (input order, then file order). Task I owns the
bytes [I·B/N, (I+1)·B/N):
- when there are at least N input files, whole files: a file goes to the task owning its middle byte;
- otherwise, parts of files: the lines (JSON lines, `.txt` by line) that start in the task's bytes, and the
  parquet row groups and saved-dataset rows that start there (each placed by its share of the file's bytes).
  A file that cannot be cut (compressed, a JSON array, `.txt` by paragraph or document) goes whole to the task
  owning its middle byte.
Every document belongs to exactly one task, and the tasks' documents taken in task order are the corpus in its
order: so the tasks' train (val) token streams, concatenated in task order, are those of a one-task run.
A task may own no document (more tasks than documents, or one big uncuttable file): it finishes empty.
Whole files are read by `datasets` as in a one-task run; parts of files by the readers below, which split
lines and parse them as `datasets`' own builders do (pyarrow's JSON reader; universal newlines for text).
"""

from __future__ import annotations

import io
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.json as paj
import pyarrow.parquet as pq

from data_prep.errors import DataPrepError
from data_prep.inputs import (
    COMPRESSION_SUFFIXES,
    READ_CHUNK_BYTES,
    TEXT_COLUMN,
    InputSource,
    MissingTextError,
    load_corpus,
    load_saved_dataset,
    tree_bytes,
)

CHUNK_BYTES = READ_CHUNK_BYTES  # bytes read at a time from a part of a file, as datasets does for whole files


@dataclass(frozen=True)
class Piece:
    """A part of one input that a task reads: the whole file, or units [start, stop) of it."""

    source: int  # index in the job's input sources
    unit: str  # file | bytes | row_groups | rows
    start: int = 0
    stop: int = 0


def check_task(num_tasks: int, task_id: int) -> None:
    if num_tasks < 1:
        raise DataPrepError(f"--num-tasks must be >= 1, not {num_tasks}")
    if not 0 <= task_id < num_tasks:
        raise DataPrepError(f"--task-id {task_id} is outside [0, {num_tasks}): tasks of a {num_tasks}-task job are "
                            f"numbered 0 to {num_tasks - 1} (a SLURM array: --array=0-{num_tasks - 1})")


def _cuttable_by_lines(source: InputSource, sample_by: str) -> bool:
    path = Path(source.path)
    if path.suffix in COMPRESSION_SUFFIXES:
        return False
    if source.format == "text":
        return sample_by == "line"
    if source.format == "json":
        with open(path, "rb") as f:
            return f.read(4096).lstrip()[:1] != b"["  # a JSON array is one document list, not lines
    return False


def _unit_weights(source: InputSource) -> tuple[str, list[int]] | None:
    """The units a file can be cut into and their sizes (bytes, or 1 per row), or None if it is whole."""
    if source.format == "parquet":
        meta = pq.ParquetFile(source.path).metadata
        return "row_groups", [meta.row_group(k).total_byte_size for k in range(meta.num_row_groups)]
    if source.format == "disk":
        return "rows", [1] * len(load_saved_dataset(source.path))
    return None


def plan_tasks(sources: Sequence[InputSource], num_tasks: int, sample_by: str) -> list[list[Piece]]:
    """Every task's pieces (see the module docstring); the same on every node for the same inputs."""
    sizes = [tree_bytes(s.path) for s in sources]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    total = max(sum(sizes), 1)
    lows = [i * total // num_tasks for i in range(num_tasks)]

    def owner(byte: int) -> int:
        return bisect_right(lows, byte) - 1

    shares: list[list[Piece]] = [[] for _ in range(num_tasks)]
    for k, (source, size, offset) in enumerate(zip(sources, sizes, offsets)):
        whole = owner(offset + size // 2)
        if len(sources) >= num_tasks:
            shares[whole].append(Piece(k, "file"))
        elif _cuttable_by_lines(source, sample_by):
            for i in range(owner(offset), owner(offset + size - 1) + 1):
                hi = lows[i + 1] if i + 1 < num_tasks else total
                shares[i].append(Piece(k, "bytes", max(lows[i], offset) - offset, min(hi, offset + size) - offset))
        elif (units := _unit_weights(source)) is not None and units[1]:
            unit, weights = units
            placed, before = [], 0
            for weight in weights:
                placed.append(owner(offset + size * before // max(sum(weights), 1)))
                before += weight
            for i in sorted(set(placed)):
                shares[i].append(Piece(k, unit, placed.index(i), len(placed) - placed[::-1].index(i)))
        else:
            shares[whole].append(Piece(k, "file"))
    return shares


def describe_share(pieces: Sequence[Piece], sources: Sequence[InputSource]) -> list[dict]:
    """A task's pieces for its manifest: which file, which units."""
    return [{"path": sources[p.source].path, **{k: v for k, v in asdict(p).items() if k != "source"}}
            for p in pieces]


# ---------------------------------------------------------------------------------------------------------
# reading parts of files: objects with `iter(batch_size)`, like a streaming `datasets.IterableDataset`

class _LineRange:
    """The lines of a JSON lines or text file that start in bytes [start, stop)."""

    def __init__(self, source: InputSource, text_field: str, start: int, stop: int) -> None:
        self.source, self.text_field, self.start, self.stop = source, text_field, start, stop

    def _chunks(self) -> Iterator[bytes]:
        with open(self.source.path, "rb") as f:
            pos = self.start
            if pos > 0:
                f.seek(pos - 1)
                pos += len(f.readline()) - 1  # the line that started before `start` is another task's
            while pos < self.stop:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    return
                chunk += f.readline()
                if pos + len(chunk) > self.stop:  # keep the lines that start before `stop`
                    cut = chunk.find(b"\n", self.stop - 1 - pos)
                    chunk = chunk if cut < 0 else chunk[:cut + 1]
                pos += len(chunk)
                yield chunk

    def _texts(self, chunk: bytes) -> list:
        if self.source.format == "text":  # as datasets' text builder: universal newlines, split on "\n"
            text = io.TextIOWrapper(io.BytesIO(chunk), encoding="utf-8", newline=None).read()
            return [line.rstrip("\n") for line in StringIO(text).readlines()]
        if not chunk.strip():
            return []
        table = paj.read_json(io.BytesIO(chunk), read_options=paj.ReadOptions(block_size=len(chunk) + 1))
        if self.text_field not in table.column_names:
            raise MissingTextError(f"{self.source.path}: a record has no '{self.text_field}' field")
        column = table.column(self.text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_null(column.type)):
            raise MissingTextError(f"{self.source.path}: field '{self.text_field}' holds {column.type}, not text")
        return column.to_pylist()

    def iter(self, batch_size: int) -> Iterator[dict]:
        for chunk in self._chunks():
            texts = self._texts(chunk)
            for lo in range(0, len(texts), batch_size):
                yield {TEXT_COLUMN: texts[lo:lo + batch_size]}


class _RowGroups:
    """Row groups [start, stop) of a parquet file, the text column only."""

    def __init__(self, source: InputSource, text_field: str, start: int, stop: int) -> None:
        self.source, self.text_field, self.start, self.stop = source, text_field, start, stop

    def iter(self, batch_size: int) -> Iterator[dict]:
        file = pq.ParquetFile(self.source.path)
        if self.text_field not in file.schema_arrow.names:
            raise DataPrepError(f"{self.source.path} has no '{self.text_field}' column (its columns: "
                                f"{sorted(file.schema_arrow.names)}); pass --text-field NAME to choose the "
                                f"column holding the text")
        for batch in file.iter_batches(batch_size=batch_size, row_groups=range(self.start, self.stop),
                                       columns=[self.text_field]):
            column = batch.column(0)
            if pa.types.is_large_string(column.type):
                column = column.cast(pa.string())
            yield {TEXT_COLUMN: column.to_pylist()}


def load_share(sources: Sequence[InputSource], pieces: Sequence[Piece], text_field: str, sample_by: str,
               streaming: bool, cache_dir: str | None) -> list:
    """The parts a task reads, in order: `datasets` parts for runs of whole files, readers for parts of files."""
    parts: list = []
    whole: list[InputSource] = []
    for piece in pieces:
        source = sources[piece.source]
        if piece.unit == "file":
            whole.append(source)
            continue
        if whole:
            parts += load_corpus(whole, text_field, sample_by, streaming, cache_dir)
            whole = []
        if piece.unit == "bytes":
            parts.append(_LineRange(source, text_field, piece.start, piece.stop))
        elif piece.unit == "row_groups":
            parts.append(_RowGroups(source, text_field, piece.start, piece.stop))
        else:
            rows = load_corpus([source], text_field, sample_by, streaming=False, cache_dir=cache_dir)[0]
            parts.append(rows.select(range(piece.start, piece.stop)))
    if whole:
        parts += load_corpus(whole, text_field, sample_by, streaming, cache_dir)
    return parts


def dataset_rows(parts: Sequence) -> int | None:
    """Documents in the parts, when known without reading them (Arrow datasets only)."""
    return sum(len(p) for p in parts) if all(isinstance(p, datasets.Dataset) for p in parts) else None

"""Reading a corpus: input paths → HF `datasets` → batches of document texts.

Accepted inputs (mixed freely; the order of the paths is the order of the documents):
- text files (`.txt`): one document per line (`--sample-by line`, HF's default), per blank-line
  separated paragraph (`paragraph`) or per file (`document`);
- JSON lines / JSON files (`.jsonl`, `.json`): one document per record, its text in `--text-field`;
- parquet files (`.parquet`): one document per row, its text in the `--text-field` column;
- a folder written by `Dataset.save_to_disk` (its `train` split if it is a `DatasetDict`);
- any other folder: every file with one of the extensions above inside it, in sorted path order.
Compressed files (`.gz`, `.bz2`, `.xz`, `.zst`) are read by `datasets` as they are.

`datasets` reports bad input without naming the file (a bare `UnicodeDecodeError`, "JSON parse error in
row 1"). Scanning a terabyte up front to name it would double the work, so `reading_inputs` only scans
when something failed, to turn the failure into an error naming the file and line.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import datasets

from data_prep.errors import DataPrepError

FORMAT_OF_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
SAMPLE_BY = ("line", "paragraph", "document")
TEXT_COLUMN = "text"  # every source is normalised to one string column of this name
READ_CHUNK_BYTES = 1 << 20  # what `datasets` reads of a text / JSON lines file at a time


@dataclass(frozen=True)
class InputSource:
    """One input: a file read by a packaged `datasets` builder, or a saved dataset folder (`disk`)."""

    format: str  # text | json | parquet | disk
    path: str  # absolute

    def describe(self) -> dict:
        """Identity for the manifest and for resuming: a changed file is a different dataset."""
        stat = os.stat(self.path)
        return {"path": self.path, "format": self.format, "bytes": tree_bytes(self.path),
                "mtime_ns": stat.st_mtime_ns}


class MissingTextError(DataPrepError):
    """A text field that is missing, null or not a string; `reading_inputs` finds the file and line."""

    @classmethod
    def at(cls, row: int, value: object) -> MissingTextError:
        what = "has no text" if value is None else f"holds a {type(value).__name__}, not text"
        return cls(f"document {row} (counting from 0 over all inputs) {what}; pass --text-field NAME to "
                   f"choose the field holding the text")


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return FORMAT_OF_SUFFIX.get(Path(name).suffix)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def resolve_inputs(paths: Sequence[str]) -> list[InputSource]:
    """Expand input paths into sources, refusing missing, empty and unknown inputs by name."""
    if not paths:
        raise DataPrepError("no input given: pass --input FILE_OR_FOLDER ...")
    sources: list[InputSource] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise DataPrepError(f"input {raw} does not exist")
        if path.is_dir() and _is_saved_dataset(path):
            sources.append(InputSource("disk", str(path)))
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]
        known = [f for f in files if _file_format(f)]
        if path.is_file() and not known:
            raise DataPrepError(f"input {raw} is not a known format: name it *.txt, *.jsonl, *.json or "
                                f"*.parquet (optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})")
        if not known:
            raise DataPrepError(f"input folder {raw} holds no .txt, .jsonl, .json or .parquet files")
        for file in known:
            if file.stat().st_size == 0:
                raise DataPrepError(f"input {file} is empty")
            sources.append(InputSource(_file_format(file), str(file)))
    return sources


def _open_text(path: str) -> IO[bytes]:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(Path(path).suffix, open)
    return opener(path, "rb")


def _check_first_record(source: InputSource, text_field: str) -> None:
    """Cheap up-front check of one record per JSON lines file: catches a wrong --text-field at once."""
    if Path(source.path).suffix == ".zst":
        return
    with _open_text(source.path) as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # a JSON array file, or broken: the full read reports it with its line
    if isinstance(record, dict) and text_field not in record:
        raise DataPrepError(f"{source.path} line 1: record has no '{text_field}' field (its fields: "
                            f"{sorted(record)}); pass --text-field NAME to choose the field holding the text")


def _select_text(ds: datasets.Dataset | datasets.IterableDataset, text_field: str, where: str):
    features = ds.features
    if features is not None and text_field not in features:
        raise DataPrepError(f"{where} has no '{text_field}' column (its columns: {sorted(features)}); "
                            f"pass --text-field NAME to choose the column holding the text")
    if features is not None:
        kind = getattr(features[text_field], "dtype", None)
        if kind not in ("string", "large_string", "null"):
            raise MissingTextError(f"{where}: column '{text_field}' holds {features[text_field]}, not text; "
                                f"pass --text-field NAME to choose the column holding the text")
    ds = ds.select_columns([text_field])
    if text_field != TEXT_COLUMN:
        ds = ds.rename_column(text_field, TEXT_COLUMN)
    if features is not None and features[text_field].dtype != "string":
        ds = ds.cast_column(TEXT_COLUMN, datasets.Value("string"))
    return ds


def _groups(sources: Sequence[InputSource]) -> Iterator[tuple[str, list[str]]]:
    """Consecutive sources of one format, so one `load_dataset` call reads many files in order."""
    group: list[InputSource] = []
    for source in sources:
        if group and (source.format != group[0].format or source.format == "disk"):
            yield group[0].format, [s.path for s in group]
            group = []
        group.append(source)
    if group:
        yield group[0].format, [s.path for s in group]


def load_saved_dataset(path: str) -> datasets.Dataset:
    """A `save_to_disk` folder (its `train` split if it is a `DatasetDict`), memory-mapped."""
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataPrepError(f"saved dataset {path} has splits {sorted(ds)} and no 'train': "
                                f"pass the folder of the split to use, e.g. {path}/{min(ds)}")
        ds = ds["train"]
    return ds


@contextlib.contextmanager
def _no_torch_import() -> Iterator[None]:
    """An `IterableDataset` imports torch when it is installed (to share its epoch with persistent DataLoader
    workers): 3 s of a 20 s `--streaming` run of 33 MB, for a process that never makes a DataLoader. Where torch
    is not imported yet, `datasets` is told it is absent while the stream is built."""
    if "torch" in sys.modules:
        yield
        return
    available = datasets.config.TORCH_AVAILABLE
    datasets.config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        datasets.config.TORCH_AVAILABLE = available


def _load_group(fmt: str, paths: list[str], text_field: str, sample_by: str, streaming: bool,
                cache_dir: str | None):
    with _no_torch_import():
        return _load_group_datasets(fmt, paths, text_field, sample_by, streaming, cache_dir)


def _load_group_datasets(fmt: str, paths: list[str], text_field: str, sample_by: str, streaming: bool,
                         cache_dir: str | None):
    if fmt == "disk":
        ds = load_saved_dataset(paths[0])
        if streaming:
            ds = ds.to_iterable_dataset(num_shards=1)  # one shard keeps the row order
        return _select_text(ds, text_field, paths[0])
    kwargs = {"sample_by": sample_by} if fmt == "text" else {}
    if fmt in ("text", "json"):
        # datasets reads these formats in chunks (10 MB by default) that it turns into a Python list of lines or
        # an Arrow table at once: for short lines that is ~20x the chunk in RAM. The documents do not depend on it.
        kwargs["chunksize"] = READ_CHUNK_BYTES
    if fmt == "parquet":
        import pyarrow.dataset

        # datasets decodes a whole row group at a time unless told a batch size: writers choose row groups of
        # 100 MB and more (pandas/pyarrow default to 1 M rows), which would all be in memory at once. And Arrow's
        # scanner pre-buffers the column chunks of every row group it will read: the whole file, ~3x its size
        # in RAM (a 103 MB file: +285 MB peak) unless pre_buffer is off.
        kwargs["batch_size"] = READ_DOCS
        if streaming:
            kwargs["fragment_scan_options"] = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
    ds = datasets.load_dataset(fmt, data_files=paths, split="train", streaming=streaming,
                               cache_dir=cache_dir, **kwargs)
    if fmt == "parquet" and streaming:
        # One stream per row group, in file order. Over a whole file, Arrow's threaded scanner decodes ahead of a
        # slow consumer without bound (batch_readahead=0 notwithstanding): +150 MB for a 100 MB file while the
        # tokenizer works, growing with the file. Per row group, what it can run ahead is that row group.
        ds = ds.reshard()
    return _select_text(ds, TEXT_COLUMN if fmt == "text" else text_field, ", ".join(paths))


def use_arrow_pool_that_returns_memory() -> None:
    """Arrow's default pool (mimalloc) keeps what the JSON and parquet readers free in per-thread heaps: reading
    33 MB of JSON lines then holds 35 MB more than reading 3.3 MB, with 4 MB of Arrow data alive at any time.
    jemalloc (the system allocator where Arrow was built without it) returns it: 1.20x -> 1.08x peak RSS over
    10x the corpus (BENCHMARKS.md). A pool named by the user in ARROW_DEFAULT_MEMORY_POOL is left as it is."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    import pyarrow

    try:
        pool = pyarrow.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pyarrow.system_memory_pool()
    pyarrow.set_memory_pool(pool)


FILES_PER_STREAM = 256  # files one streaming `load_dataset` call is given


@dataclass(frozen=True)
class LazyStream:
    """Consecutive files of one format, streamed by `datasets` once the reading gets to them and dropped after.
    `datasets` keeps a few KB of state per file it is given (17,860 files: +41 MB before the first document), so
    a folder of many small files is given to it FILES_PER_STREAM files at a time."""

    fmt: str
    paths: list[str]
    text_field: str
    sample_by: str
    cache_dir: str | None

    def iter(self, batch_size: int) -> Iterator[dict]:
        stream = _load_group(self.fmt, self.paths, self.text_field, self.sample_by, True, self.cache_dir)
        yield from stream.iter(batch_size=batch_size)


def load_corpus(sources: Sequence[InputSource], text_field: str = "text", sample_by: str = "line",
                streaming: bool = False, cache_dir: str | None = None) -> list[datasets.Dataset | LazyStream]:
    """The corpus as parts with one string column `text`, in input order.

    Non-streaming: one Arrow dataset per run of same-format inputs (cached on disk by `datasets`). Streaming:
    `LazyStream`s of at most FILES_PER_STREAM files that `datasets` reads lazily, so memory stays flat whatever
    the corpus size or its number of files.
    """
    if sample_by not in SAMPLE_BY:
        raise DataPrepError(f"--sample-by must be one of {SAMPLE_BY}, not {sample_by!r}")
    use_arrow_pool_that_returns_memory()
    for source in sources:
        if source.format == "json":
            _check_first_record(source, text_field)
    if not streaming:
        return [_load_group(fmt, paths, text_field, sample_by, False, cache_dir) for fmt, paths in _groups(sources)]
    return [LazyStream(fmt, paths[lo:lo + FILES_PER_STREAM], text_field, sample_by, cache_dir)
            for fmt, paths in _groups(sources) for lo in range(0, len(paths), FILES_PER_STREAM)]


READ_DOCS = 16  # documents `datasets` turns into Python strings at a time when batches are bounded in characters


def _read_batches(parts: Sequence[datasets.Dataset | LazyStream], read_docs: int,
                  start: int) -> Iterator[list]:
    """The texts of every row from `start` on, in the readers' batches of at most `read_docs` documents."""
    row = 0
    for part in parts:
        if isinstance(part, datasets.Dataset):
            if row + len(part) > start:
                table = part.with_format("arrow")
                for lo in range(max(start - row, 0), len(part), read_docs):
                    yield table[lo:lo + read_docs].column(TEXT_COLUMN).to_pylist()
            row += len(part)
            continue
        for batch in part.iter(batch_size=read_docs):
            texts = batch[TEXT_COLUMN]
            if row + len(texts) > start:
                yield texts[max(start - row, 0):]
            row += len(texts)


def iter_text_batches(parts: Sequence[datasets.Dataset | LazyStream], batch_size: int,
                      start: int = 0, max_chars: int | None = None) -> Iterator[tuple[int, list]]:
    """(index of the first document, texts) batches over all parts, skipping the first `start` rows.

    A batch holds at most `batch_size` documents and, with `max_chars`, at most that many characters (or
    one longer document), so what is in flight is bounded in bytes, not only in documents. Then the readers
    hand over `READ_DOCS` documents at a time, regrouped here: 256 documents of a heavy-tailed corpus (source
    code, books) can be 10 MB of text, which `datasets` holds as Arrow and as Python strings at once.
    Skipped rows of a streaming part are still parsed (a stream cannot seek) but not tokenized.
    """
    first = start
    if max_chars is None:
        for texts in _read_batches(parts, batch_size, start):
            yield first, texts
            first += len(texts)
        return
    pending: list = []
    chars = 0
    for texts in _read_batches(parts, min(batch_size, READ_DOCS), start):
        for text in texts:
            size = len(text) if isinstance(text, str) else 0
            if pending and (len(pending) >= batch_size or chars + size > max_chars):
                yield first, pending
                first += len(pending)
                pending, chars = [], 0
            pending.append(text)
            chars += size
    if pending:
        yield first, pending


def _first_problem_in_file(source: InputSource, text_field: str) -> str | None:
    """Scan one text/JSON file for the first line that is not UTF-8, not JSON or lacks the text."""
    with _open_text(source.path) as f:
        lines = 0
        for lineno, raw in enumerate(f, start=1):
            lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{source.path} line {lineno} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                        f"column {err.start + 1}); convert the file to UTF-8, e.g. with iconv")
            if source.format != "json" or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if lineno == 1 and line.lstrip().startswith("["):
                    return None  # a JSON array file: not line-oriented
                return f"{source.path} line {lineno} is not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(record, dict):
                return f"{source.path} line {lineno} is a JSON {type(record).__name__}, not an object"
            value = record.get(text_field)
            if not isinstance(value, str):
                what = (f"record has no '{text_field}' field" if value is None else
                        f"the record's '{text_field}' field holds a {type(value).__name__}, not text")
                return (f"{source.path} line {lineno}: {what} (its fields: {sorted(record)}); "
                        f"pass --text-field NAME to choose the field holding the text")
        if source.format == "json" and lines == 0:
            return f"{source.path} holds no JSON records"
    return None


def find_input_problem(sources: Sequence[InputSource], text_field: str) -> str | None:
    """The first problem in the inputs, named by file and line; None if the scan finds none."""
    for source in sources:
        if source.format in ("text", "json") and Path(source.path).suffix != ".zst":
            problem = _first_problem_in_file(source, text_field)
            if problem:
                return problem
    return None


@contextlib.contextmanager
def reading_inputs(sources: Sequence[InputSource], text_field: str) -> Iterator[None]:
    """Turn a failure while reading the inputs into a `DataPrepError` naming the file and line."""
    try:
        yield
    except MissingTextError as err:  # the scan can name the file and line
        raise DataPrepError(find_input_problem(sources, text_field) or str(err)) from err
    except DataPrepError:
        raise
    except Exception as err:
        problem = find_input_problem(sources, text_field)
        if problem is None:
            raise
        raise DataPrepError(problem) from err

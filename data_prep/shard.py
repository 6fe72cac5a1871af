"""Tokenize a corpus into flat token shards + `manifest.json` that every rank can memory-map.

    python -m data_prep.shard --input corpus.jsonl --tokenizer tok/ --out shards/ \\
        [--val-fraction 0.01] [--seed 0] [--num-proc 8] [--streaming] [--text-field text] \\
        [--shard-tokens 100000000] [--dtype auto|uint16|uint32] [--sample-by line|paragraph|document] \
        [--num-tasks N --task-id I]

- Reads with `datasets.load_dataset` (text / JSON lines / parquet) or `load_from_disk`: without
  `--streaming` through its Arrow cache, with `--streaming` lazily. Batches of at most `BATCH_DOCS`
  documents and `BATCH_CHARS` characters go to the Rust tokenizer (`encode_batch_fast`, one thread per
  process) here or in N worker processes, at most 2·N batches in flight, and their token ids go straight
  into the shard files as numpy arrays. Memory is bounded by the batches in flight, the reader's chunk and
  the longest document, not by the corpus. Streaming or not, any N: byte-identical shards.
- `--num-tasks N --task-id I` (defaults: a SLURM array's `SLURM_ARRAY_TASK_COUNT`/`SLURM_ARRAY_TASK_ID`):
  only task I's share of the inputs (`data_prep.tasks`), into OUT/tasks/I/ (its own shards and manifest,
  resumable the same way); `python -m data_prep.merge OUT` then writes OUT/manifest.json over all tasks.
- Holds out a validation split by document (`data_prep.encode.in_val_split`: a seeded hash of the
  text), then writes each split as shards of `--shard-tokens` tokens (see `data_prep.manifest`).
- Resumable: OUT/progress.json checkpoints (documents consumed, finished shards, length of the open
  shard) after every finished shard and every 30 s. After a kill, re-running the same command picks up
  from the last checkpoint; the result is identical to an uninterrupted run. `manifest.json` is written
  last, atomically, so it never points at missing or partial shards.
- Re-running a finished command is a no-op; a different command on the same OUT is refused.
- Bad input stops the run with an error naming the file (and line) and removes what it wrote.
- An empty document (text "") has no tokens and gets no EOS; every other document is kept whole, so
  a split's num_tokens = Σ (len(tokenizer(doc)) + 1) over its documents.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from data_prep.encode import DocumentEncoder, EncodedBatch, encode_stream
from data_prep.errors import DataPrepError, run_command
from data_prep.inputs import (
    SAMPLE_BY,
    iter_text_batches,
    load_corpus,
    reading_inputs,
    resolve_inputs,
)
from data_prep.writer import ResumeMismatch, SplitWriter
from dist_train.formats.manifest import (
    MANIFEST_NAME,
    SPLITS,
    check_shards,
    dtype_for_vocab,
    read_manifest,
    write_json_atomic,
)
from dist_train.formats.tokenizer_folder import tokenizer_sha256
from data_prep.rust_tokenizer import load_rust_tokenizer
from data_prep.tasks import check_task, dataset_rows, describe_share, load_share, plan_tasks

log = logging.getLogger("data_prep.shard")

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16: few files, yet each a cheap unit to rewrite
BATCH_DOCS = 256  # at most this many documents per tokenizer call (and checkpoint granule) ...
BATCH_CHARS = 1 << 18  # ... and at most this many characters (256 KiB), unless one document is longer
CHECKPOINT_SECONDS = 30.0
PROGRESS_NAME = "progress.json"
TASKS_DIR = "tasks"  # OUT/tasks/ID/: one task's shards and manifest (--num-tasks)
TOKENIZED_DIR = ".tokenized"  # Arrow files of runs made before tokenizing went straight to shards: removed
_OURS = re.compile(rf"^({'|'.join(SPLITS)})(_\d{{5,}}\.bin|\.partial)$|^(manifest|progress)\.json(\.tmp)?$"
                   rf"|^{re.escape(TOKENIZED_DIR)}$")


_WHAT_DIFFERS = {"sources": "sources (the input files, their sizes or modification times)",
                 "tokenizer": "tokenizer (its path)"}


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable names of the settings in which two dataset headers differ."""
    keys = sorted(set(old) | set(new))
    diffs = [_WHAT_DIFFERS.get(k, k) for k in keys if k != "prep" and old.get(k) != new.get(k)]
    old_prep, new_prep = old.get("prep", {}), new.get("prep", {})
    diffs += [f"prep.{k}" for k in sorted(set(old_prep) | set(new_prep)) if old_prep.get(k) != new_prep.get(k)]
    return diffs


def _remove_our_files(out: Path) -> None:
    for path in out.iterdir() if out.is_dir() else []:
        if _OURS.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _finished_result(out: Path, header: dict) -> dict | None:
    """The existing manifest if OUT already holds this very dataset; refuse a different one."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    manifest = read_manifest(out)
    diffs = differences({k: v for k, v in manifest.items() if k != "splits"}, header)
    if diffs:
        raise DataPrepError(f"output folder {out} already holds a different dataset (it differs in: "
                            f"{', '.join(diffs)}); choose another --out or delete the folder")
    check_shards(out, manifest)
    for leftover in (PROGRESS_NAME, PROGRESS_NAME + ".tmp", TOKENIZED_DIR):
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    log.info("%s already holds this dataset; nothing to do", out)
    return manifest


def _start_state(out: Path, header: dict) -> dict:
    """The checkpoint to continue from: a matching OUT/progress.json, or a fresh one."""
    progress = out / PROGRESS_NAME
    if progress.is_file():
        state = json.loads(progress.read_text())
        diffs = differences(state["header"], header)
        if diffs:
            raise DataPrepError(f"output folder {out} holds an unfinished run of a different dataset (it "
                                f"differs in: {', '.join(diffs)}); re-run that command to finish it, or "
                                f"choose another --out, or delete the folder")
        log.info("resuming %s after document %d", out, state["docs_done"])
        return state
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
        if others:
            raise DataPrepError(f"output folder {out} is not empty and holds no dataset of ours "
                                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                                f"choose another --out")
        _remove_our_files(out)  # a run killed before its first checkpoint
    out.mkdir(parents=True, exist_ok=True)
    state = {"header": header, "docs_done": 0, "splits": {}}
    write_json_atomic(progress, state)
    return state


def _open_writers(out: Path, state: dict, dtype: str, shard_tokens: int) -> dict[str, SplitWriter]:
    try:
        return {s: SplitWriter(out, s, dtype, shard_tokens, state["splits"].get(s)) for s in SPLITS}
    except ResumeMismatch as err:
        log.warning("cannot resume (%s); starting over", err)
        _remove_our_files(out)
        state.update(docs_done=0, splits={})
        write_json_atomic(out / PROGRESS_NAME, state)
        return {s: SplitWriter(out, s, dtype, shard_tokens) for s in SPLITS}


@contextlib.contextmanager
def _datasets_quiet(quiet: bool) -> Iterator[None]:
    """`datasets` prints its own bars and notices; hide them when the caller asked for no progress."""
    was_disabled = datasets.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    if quiet:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(level)


def _write_all(out: Path, batches: Iterator[EncodedBatch], writers: dict[str, SplitWriter], state: dict,
               total_docs: int | None, progress: bool) -> None:
    last_checkpoint = time.monotonic()
    tokens = 0
    with tqdm(total=total_docs, initial=state["docs_done"], unit="doc", desc="sharding",
              disable=not progress) as bar:
        for batch in batches:
            val_tokens = np.repeat(batch.is_val, batch.lengths)
            completed = writers["train"].write(batch.tokens[~val_tokens])
            completed += writers["val"].write(batch.tokens[val_tokens])
            nonempty = batch.lengths > 0
            writers["train"].num_documents += int((nonempty & ~batch.is_val).sum())
            writers["val"].num_documents += int((nonempty & batch.is_val).sum())
            state["docs_done"] += len(batch.lengths)
            if completed or time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                for writer in writers.values():
                    writer.sync()
                state["splits"] = {s: w.state() for s, w in writers.items()}
                write_json_atomic(out / PROGRESS_NAME, state)
                last_checkpoint = time.monotonic()
            tokens += len(batch.tokens)
            bar.update(len(batch.lengths))
            bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)


def _check_args(val_fraction: float, seed: int, num_proc: int, shard_tokens: int, sample_by: str) -> None:
    if not 0 <= val_fraction < 1:
        raise DataPrepError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    if seed < 0:
        raise DataPrepError(f"--seed must be >= 0, not {seed}")
    if num_proc < 1:
        raise DataPrepError(f"--num-proc must be >= 1, not {num_proc}")
    if shard_tokens < 1:
        raise DataPrepError(f"--shard-tokens must be >= 1, not {shard_tokens}")
    if sample_by not in SAMPLE_BY:
        raise DataPrepError(f"--sample-by must be one of {SAMPLE_BY}, not {sample_by!r}")


def _header(sources: list, tok_dir: Path, dtype: str, prep: dict, task: dict | None) -> dict:
    tok = load_rust_tokenizer(tok_dir)[1]
    header = {"vocab_size": tok.vocab_size, "dtype": dtype_for_vocab(tok.vocab_size, dtype),
              "eos_token_id": tok.eos_token_id, "tokenizer": str(tok_dir),
              "sources": [s.describe() for s in sources],
              "prep": {**prep, "tokenizer_sha256": tokenizer_sha256(tok_dir)}}
    return header if task is None else {**header, "task": task}


def _tokenize(out_dir: Path, parts: list, header: dict, state: dict, num_proc: int, progress: bool) -> dict:
    """Read, encode and write until the parts are done; the splits' manifest entries."""
    prep = header["prep"]
    writers = _open_writers(out_dir, state, header["dtype"], prep["shard_tokens"])
    encoder = DocumentEncoder(header["tokenizer"], header["eos_token_id"], prep["seed"], prep["val_fraction"])
    texts = iter_text_batches(parts, BATCH_DOCS, start=state["docs_done"], max_chars=BATCH_CHARS)
    _write_all(out_dir, encode_stream(texts, encoder, num_proc), writers, state, dataset_rows(parts), progress)
    return {s: w.close() for s, w in writers.items()}


def shard_corpus(inputs: Sequence[str], tokenizer: str, out: str, *, val_fraction: float = 0.01,
                 seed: int = 0, num_proc: int = 1, streaming: bool = False, text_field: str = "text",
                 sample_by: str = "line", shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: str = "auto",
                 cache_dir: str | None = None, progress: bool = True, num_tasks: int | None = None,
                 task_id: int = 0) -> dict:
    """Tokenize `inputs` into shards under `out`; returns the manifest (see the module docstring).

    With `num_tasks`, only task `task_id`'s share of the inputs (`data_prep.tasks`), into `out/tasks/ID/`.
    """
    _check_args(val_fraction, seed, num_proc, shard_tokens, sample_by)
    sources = resolve_inputs(inputs)
    out_dir = Path(out).expanduser().resolve()
    task, pieces = None, None
    if num_tasks is not None:
        check_task(num_tasks, task_id)
        pieces = plan_tasks(sources, num_tasks, sample_by)[task_id]
        task = {"num_tasks": num_tasks, "id": task_id, "share": describe_share(pieces, sources)}
        out_dir = out_dir / TASKS_DIR / str(task_id)
    prep = {"text_field": text_field, "sample_by": sample_by, "val_fraction": val_fraction, "seed": seed,
            "shard_tokens": shard_tokens}
    header = _header(sources, Path(tokenizer).expanduser().resolve(), dtype, prep, task)
    finished = _finished_result(out_dir, header)
    if finished:
        return finished
    missing = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    state = _start_state(out_dir, header)
    try:
        with reading_inputs(sources, text_field), _datasets_quiet(not progress):
            if pieces is None:
                parts = load_corpus(sources, text_field, sample_by, streaming, cache_dir)
            else:
                parts = load_share(sources, pieces, text_field, sample_by, streaming, cache_dir)
            splits = _tokenize(out_dir, parts, header, state, num_proc, progress)
        if splits["train"]["num_tokens"] == 0 and task is None:
            raise DataPrepError(f"inputs {', '.join(map(str, inputs))} hold no text for the train split")
    except DataPrepError:
        _remove_our_files(out_dir)
        for folder in missing:  # only the folders this run made, deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    if task is not None and splits["train"]["num_documents"] + splits["val"]["num_documents"] == 0:
        log.warning("task %d of %d has no documents (more tasks than the inputs can be cut into); it finishes "
                    "empty, which is fine", task_id, num_tasks)
    elif val_fraction > 0 and splits["val"]["num_tokens"] == 0:
        log.warning("no document fell into the val split (val_fraction=%s); raise --val-fraction for a "
                    "validation loss", val_fraction)
    manifest = {**header, "splits": splits}
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    (out_dir / PROGRESS_NAME).unlink()
    shutil.rmtree(out_dir / TOKENIZED_DIR, ignore_errors=True)
    return manifest


def _env_int(name: str) -> int | None:
    """A SLURM array variable as the default of an option (the launcher's environment, read here only)."""
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text/JSONL/parquet files or folders, or saved HF dataset folders")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder (data_prep.tokenizer --out)")
    parser.add_argument("--out", required=True, help="shard folder to write")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out "
                        "for validation (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--streaming", action="store_true", help="read lazily: flat memory for corpora "
                        "larger than RAM")
    parser.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    parser.add_argument("--sample-by", default="line", choices=SAMPLE_BY,
                        help="what a document is in .txt files (default: line)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                        help="token dtype (default: uint16 if the vocabulary fits, else uint32)")
    parser.add_argument("--cache-dir", help="datasets cache folder (default: HF's)")
    parser.add_argument("--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT"),
                        help="split the job into N tasks (nodes); this run does one, into OUT/tasks/ID/; then "
                             "`python -m data_prep.merge OUT` (default: $SLURM_ARRAY_TASK_COUNT, else one job)")
    parser.add_argument("--task-id", type=int, default=_env_int("SLURM_ARRAY_TASK_ID"),
                        help="which task, in [0, N) (default: $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.num_tasks is not None and args.task_id is None:
        parser.error("--num-tasks needs --task-id (or $SLURM_ARRAY_TASK_ID)")
    if args.task_id is not None and args.num_tasks is None:
        parser.error("--task-id needs --num-tasks (or $SLURM_ARRAY_TASK_COUNT)")
    manifest = shard_corpus(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            seed=args.seed, num_proc=args.num_proc, streaming=args.streaming,
                            text_field=args.text_field, sample_by=args.sample_by,
                            shard_tokens=args.shard_tokens, dtype=args.dtype, cache_dir=args.cache_dir,
                            progress=not args.no_progress, num_tasks=args.num_tasks,
                            task_id=args.task_id or 0)
    out = Path(args.out).resolve()
    out = out if args.num_tasks is None else out / TASKS_DIR / str(args.task_id)
    print_summary({"out": str(out), "dtype": manifest["dtype"], "vocab_size": manifest["vocab_size"]}, manifest,
                  args.json)
    return 0


def print_summary(head: dict, manifest: dict, as_json: bool) -> None:
    """What a command made: `head`, then each split's manifest fields (shards counted), as JSON or aligned text."""
    summary = {**head, **{f"{s}_{k}": (len(v) if k == "shards" else v) for s in SPLITS
                          for k, v in manifest["splits"][s].items()}}
    print(json.dumps(summary) if as_json else
          "\n".join(f"{k:>20}: {v:,}" if isinstance(v, int) else f"{k:>20}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    run_command(main)

"""Merge the tasks of a split prep job (`data_prep.shard --num-tasks N`) into one shard folder.

    python -m data_prep.merge OUT [--size-only] [--json]

Checks that every task 0..N-1 under OUT/tasks/ finished (its manifest.json is there), that all ran with the
same settings (inputs, tokenizer, val fraction, seed, shard size, ...) and that every shard they list is there
with its size and sha256 (`--size-only`: sizes only), then writes OUT/manifest.json listing every task's
shards in task order, by paths relative to OUT (`tasks/I/train_00000.bin`): no token is copied. The train and
val token streams it describes are byte for byte those of a one-task run of the same inputs. Re-running it
writes the same manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from data_prep.errors import DataPrepError, run_command
from data_prep.shard import PROGRESS_NAME, TASKS_DIR, differences, print_summary
from dist_train.formats.manifest import MANIFEST_NAME, SPLITS, check_shards, read_manifest, write_json_atomic

log = logging.getLogger("data_prep.merge")


def _task_manifest(out: Path, task_id: int, num_tasks: int) -> dict:
    folder = out / TASKS_DIR / str(task_id)
    if not (folder / MANIFEST_NAME).is_file():
        if (folder / PROGRESS_NAME).is_file():
            done = json.loads((folder / PROGRESS_NAME).read_text())["docs_done"]
            raise DataPrepError(f"task {task_id} of {num_tasks} is unfinished ({folder / PROGRESS_NAME}: "
                                f"{done} documents done); re-run it (same command, --task-id {task_id}), then merge")
        raise DataPrepError(f"task {task_id} of {num_tasks} has not run ({folder / MANIFEST_NAME} does not exist); "
                            f"run it (same command, --task-id {task_id}), then merge")
    return read_manifest(folder)


def _num_tasks(out: Path) -> int:
    tasks = out / TASKS_DIR
    found = sorted(int(p.name) for p in tasks.iterdir() if p.name.isdigit()) if tasks.is_dir() else []
    for task_id in found:
        for name in (MANIFEST_NAME, PROGRESS_NAME):
            path = tasks / str(task_id) / name
            if path.is_file():
                header = json.loads(path.read_text())
                num_tasks = (header.get("header", header).get("task") or {}).get("num_tasks", 0)
                if num_tasks < 1:
                    raise DataPrepError(f"{path} was not written by a task (no `task` entry); {out} is not the "
                                        f"--out folder of a job run with --num-tasks")
                return num_tasks
    raise DataPrepError(f"{out} holds no tasks ({tasks}/ID/ folders): run `python -m data_prep.shard ... --out "
                        f"{out} --num-tasks N --task-id I` for every I first")


def _settings(manifest: dict) -> dict:
    """What every task of one job shares: the manifest without its splits and its own task id and share."""
    header = {k: v for k, v in manifest.items() if k not in ("splits", "task")}
    return {**header, "num_tasks": manifest["task"]["num_tasks"]}


def merge_tasks(out: str | os.PathLike, checksums: bool = True) -> dict:
    """Check every task and write OUT/manifest.json over all of them; returns it."""
    out = Path(out).expanduser().resolve()
    num_tasks = _num_tasks(out)
    existing = out / MANIFEST_NAME
    if existing.is_file() and not all(s["path"].startswith(f"{TASKS_DIR}/") for split in
                                       read_manifest(out)["splits"].values() for s in split["shards"]):
        raise DataPrepError(f"{existing} describes a one-task dataset, not the tasks in {out / TASKS_DIR}; "
                            f"merge into a folder of its own")
    manifests = [_task_manifest(out, i, num_tasks) for i in range(num_tasks)]
    first = _settings(manifests[0])
    splits = {s: {"num_tokens": 0, "num_documents": 0, "shards": []} for s in SPLITS}
    for task_id, manifest in enumerate(manifests):
        diffs = differences(first, _settings(manifest))
        if diffs:
            raise DataPrepError(f"task {task_id} ran with other settings than task 0 (it differs in: "
                                f"{', '.join(diffs)}); re-run task {task_id} with task 0's command")
        folder = out / TASKS_DIR / str(task_id)
        try:
            check_shards(folder, manifest, checksums=checksums)
        except DataPrepError as err:
            raise DataPrepError(f"task {task_id}: {err}") from err
        for split in SPLITS:
            entry = manifest["splits"][split]
            splits[split]["num_tokens"] += entry["num_tokens"]
            splits[split]["num_documents"] += entry["num_documents"]
            splits[split]["shards"] += [{**s, "path": f"{TASKS_DIR}/{task_id}/{s['path']}"} for s in entry["shards"]]
    empty = [i for i, m in enumerate(manifests) if not any(m["splits"][s]["num_documents"] for s in SPLITS)]
    if empty:
        log.info("tasks %s had no documents (more tasks than the inputs could be cut into)", empty)
    if splits["train"]["num_tokens"] == 0:
        raise DataPrepError(f"the tasks in {out / TASKS_DIR} hold no text for the train split")
    header = {k: v for k, v in first.items() if k != "num_tasks"}
    manifest = {**header, "prep": {**header["prep"], "num_tasks": num_tasks}, "splits": splits}
    write_json_atomic(existing, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the --out folder of the tasks (holding tasks/0, tasks/1, ...)")
    parser.add_argument("--size-only", action="store_true", help="check shard sizes, skip the sha256s")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    manifest = merge_tasks(args.out, checksums=not args.size_only)
    print_summary({"out": str(Path(args.out).resolve()), "tasks": manifest["prep"]["num_tasks"]}, manifest, args.json)
    return 0


if __name__ == "__main__":
    run_command(main)

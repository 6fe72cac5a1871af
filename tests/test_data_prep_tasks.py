"""data_prep split into N tasks (`data_prep.shard --num-tasks N --task-id I` + `data_prep.merge`), with real
`datasets`, the real Rust tokenizer and real subprocesses: the merged streams are a one-task run's."""

from __future__ import annotations

import json
import sysconfig
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from data_prep.errors import DataPrepError
from data_prep.merge import merge_tasks
from data_prep.shard import shard_corpus
from dist_train.data.loader import TokenLoader
from dist_train.formats.manifest import DTYPES, read_manifest

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"val_fraction": 0.1, "seed": 0, "shard_tokens": 20_000, "progress": False}
KINDS = ("one_jsonl", "many_files", "parquet", "txt")


def stream(folder: Path, split: str) -> bytes:
    manifest = read_manifest(folder)
    assert manifest["dtype"] in DTYPES
    return b"".join((folder / s["path"]).read_bytes() for s in manifest["splits"][split]["shards"])


def run_tasks(inputs: list[Path], tokenizer: Path, out: Path, cache: Path, num_tasks: int, **overrides) -> dict:
    for task_id in range(num_tasks):
        shard_corpus([str(p) for p in inputs], str(tokenizer), str(out), cache_dir=str(cache),
                     num_tasks=num_tasks, task_id=task_id, **{**SETTINGS, **overrides})
    return merge_tasks(out)


@pytest.fixture(scope="module")
def task_inputs(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The first 400 Shakespeare documents (1.2 MB) as one JSONL file, 7 JSONL files, one parquet file of 8
    row groups, and one .txt file (one document per line)."""
    docs = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").splitlines()[:400]]
    src = tmp_path_factory.mktemp("task_inputs")
    (src / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (src / "many").mkdir()
    for k in range(7):
        part = docs[k * 60:(k + 1) * 60]
        (src / "many" / f"part{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(src / "all.parquet"), batch_size=50)
    (src / "all.txt").write_text("".join(" ".join(d.split()) + "\n" for d in docs), encoding="utf-8")
    return {"one_jsonl": [src / "all.jsonl"], "many_files": [src / "many"], "parquet": [src / "all.parquet"],
            "txt": [src / "all.txt"]}


@pytest.fixture(scope="module")
def one_task(task_inputs, tokenizer_dir, datasets_cache, tmp_path_factory) -> dict[str, Path]:
    """Each input sharded the ordinary way, without tasks: the reference."""
    out = tmp_path_factory.mktemp("one_task")
    for kind, inputs in task_inputs.items():
        shard_corpus([str(p) for p in inputs], str(tokenizer_dir), str(out / kind), cache_dir=str(datasets_cache),
                     **SETTINGS)
    return {kind: out / kind for kind in task_inputs}


@pytest.mark.parametrize("num_tasks", [1, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_n_tasks_then_merge_give_the_token_streams_of_one_task(kind, num_tasks, task_inputs, one_task,
                                                               tokenizer_dir, datasets_cache, tmp_path):
    if kind == "parquet":
        assert datasets.load_dataset("parquet", data_files=str(task_inputs[kind][0]), split="train",
                                     cache_dir=str(datasets_cache)).num_rows == 400
    merged = run_tasks(task_inputs[kind], tokenizer_dir, tmp_path / "out", datasets_cache, num_tasks)
    reference = read_manifest(one_task[kind])
    for split in ("train", "val"):
        assert stream(tmp_path / "out", split) == stream(one_task[kind], split)
        assert merged["splits"][split]["num_documents"] == reference["splits"][split]["num_documents"]
    assert reference["splits"]["val"]["num_documents"] > 10
    shares = [read_manifest(tmp_path / "out" / "tasks" / str(i))["task"]["share"] for i in range(num_tasks)]
    task_docs = [sum(read_manifest(tmp_path / "out" / "tasks" / str(i))["splits"][s]["num_documents"]
                     for s in ("train", "val")) for i in range(num_tasks)]
    assert all(n > 0 for n in task_docs)  # every task did some of the work
    units = {p["unit"] for share in shares for p in share}
    # Many files: whole files per task; one file: cut into lines (bytes) or parquet row groups.
    assert units == ({"file"} if kind == "many_files" or num_tasks == 1
                     else {"row_groups"} if kind == "parquet" else {"bytes"})
    paths = [s["path"] for s in merged["splits"]["train"]["shards"]]
    assert paths == sorted(paths, key=lambda p: (int(p.split("/")[1]), p)) and paths[0].startswith("tasks/0/")


def test_merged_manifest_feeds_the_training_loader_the_same_samples(task_inputs, one_task, tokenizer_dir,
                                                                   datasets_cache, tmp_path):
    run_tasks(task_inputs["one_jsonl"], tokenizer_dir, tmp_path / "out", datasets_cache, 3)
    loaders = [TokenLoader([(str(folder), 1.0)], "train", 64, 4, rank=0, world_size=1, seed=0,
                           verify_checksums=True) for folder in (tmp_path / "out", one_task["one_jsonl"])]
    for _ in range(20):
        (x_merged, y_merged), (x_one, y_one) = (loader.next_batch() for loader in loaders)
        assert torch.equal(x_merged, x_one) and torch.equal(y_merged, y_one)
    assert loaders[0].num_samples == loaders[1].num_samples and loaders[0].num_samples[0] > 1000


def test_task_id_outside_the_range_is_refused_and_nothing_is_written(task_inputs, tokenizer_dir, datasets_cache,
                                                                      tmp_path):
    for task_id in (4, -1):
        with pytest.raises(DataPrepError, match=rf"--task-id {task_id} is outside \[0, 4\)"):
            shard_corpus([str(task_inputs["one_jsonl"][0])], str(tokenizer_dir), str(tmp_path / "out"),
                         cache_dir=str(datasets_cache), num_tasks=4, task_id=task_id, **SETTINGS)
    assert not (tmp_path / "out").exists()


def test_more_tasks_than_documents_leaves_empty_tasks_that_say_so_and_merge(tokenizer_dir, datasets_cache, tmp_path,
                                                                            caplog):
    (tmp_path / "three.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n"
                                                  for i in range(3)))
    reference = shard_corpus([str(tmp_path / "three.jsonl")], str(tokenizer_dir), str(tmp_path / "one"),
                             cache_dir=str(datasets_cache), **{**SETTINGS, "val_fraction": 0.0})
    with caplog.at_level("WARNING"):
        run_tasks([tmp_path / "three.jsonl"], tokenizer_dir, tmp_path / "out", datasets_cache, 8, val_fraction=0.0)
    docs = [read_manifest(tmp_path / "out" / "tasks" / str(i))["splits"]["train"]["num_documents"] for i in range(8)]
    empty = [i for i, n in enumerate(docs) if n == 0]
    assert len(empty) == 5
    assert sum(f"task {i} of 8 has no documents" in caplog.text for i in empty) == 5
    assert stream(tmp_path / "out", "train") == stream(tmp_path / "one", "train")
    assert reference["splits"]["train"]["num_documents"] == 3


def test_merge_refuses_a_missing_unfinished_differently_set_or_damaged_task_naming_it(
        task_inputs, tokenizer_dir, datasets_cache, tmp_path):
    inputs, out = [str(task_inputs["one_jsonl"][0])], tmp_path / "out"

    def task(task_id: int, **overrides) -> None:
        shard_corpus(inputs, str(tokenizer_dir), str(out), cache_dir=str(datasets_cache), num_tasks=3,
                     task_id=task_id, **{**SETTINGS, **overrides})

    task(0)
    task(2)
    with pytest.raises(DataPrepError, match=r"task 1 of 3 has not run .*tasks/1/manifest.json does not exist"):
        merge_tasks(out)
    (out / "tasks" / "1").mkdir()
    (out / "tasks" / "1" / "progress.json").write_text(json.dumps({"docs_done": 17, "header": {}}))
    with pytest.raises(DataPrepError, match=r"task 1 of 3 is unfinished .*17 documents done"):
        merge_tasks(out)
    (out / "tasks" / "1" / "progress.json").unlink()
    task(1, seed=1)
    with pytest.raises(DataPrepError, match=r"task 1 ran with other settings than task 0 \(it differs in: prep.seed"):
        merge_tasks(out)
    (out / "tasks" / "1" / "manifest.json").unlink()
    for leftover in (out / "tasks" / "1").iterdir():
        leftover.unlink()
    task(1)
    merge_tasks(out)
    shard = out / "tasks" / "2" / "train_00001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-2])
    with pytest.raises(DataPrepError, match=rf"task 2: shard {shard} is truncated"):
        merge_tasks(out)
    shard.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(DataPrepError, match=rf"task 2: shard {shard} is corrupted"):
        merge_tasks(out)
    shard.write_bytes(original)
    assert merge_tasks(out)["prep"]["num_tasks"] == 3


@pytest.mark.slow
def test_task_killed_midway_and_rerun_ends_identical_to_an_uninterrupted_task(corpus_file, tokenizer_dir, tmp_path,
                                                                              datasets_cache):
    args = [sys.executable, "-m", "data_prep.shard", "--input", str(corpus_file), "--tokenizer", str(tokenizer_dir),
            "--val-fraction", "0.1", "--shard-tokens", "20000", "--num-proc", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "1"}  # the task comes from a SLURM array
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = killed / "tasks" / "1" / "progress.json"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the task finished before it could be killed"
            if progress.is_file() and json.loads(progress.read_text())["docs_done"] >= 256:
                break
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9 and not (killed / "tasks" / "1" / "manifest.json").exists()
    with pytest.raises(DataPrepError, match="task 0 of 3 has not run"):
        merge_tasks(killed)
    docs_done = json.loads(progress.read_text())["docs_done"]
    rerun = subprocess.run([*args, "--out", str(killed)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {killed / 'tasks' / '1'} after document {docs_done}" in rerun.stderr
    clean = tmp_path / "clean"
    shard_corpus([str(corpus_file)], str(tokenizer_dir), str(clean), cache_dir=str(datasets_cache), num_tasks=3,
                 task_id=1, **{**SETTINGS, "val_fraction": 0.1})
    files = {p.name: p.read_bytes() for p in sorted((clean / "tasks" / "1").iterdir())}
    assert {p.name: p.read_bytes() for p in sorted((killed / "tasks" / "1").iterdir())} == files
    assert len(files) > 20


def test_shard_reads_no_transformers_and_its_encoder_equals_autotokenizer(tokenizer_dir, corpus_file):
    probe = ("import sys, data_prep.shard, data_prep.merge; "
             "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    from transformers import AutoTokenizer

    from data_prep.encode import DocumentEncoder

    docs = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").splitlines()[:50]]
    docs += ["", "a literal <|endoftext|> inside", "x"]
    batch = DocumentEncoder(str(tokenizer_dir), 0, 0, 0.0).encode(0, docs)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    expected = [t for doc, d in zip(ids, docs) for t in (doc + [0] if d else [])]
    assert batch.tokens.tolist() == expected and batch.tokens.dtype == np.uint32
    assert batch.lengths.tolist() == [len(d) + 1 if t else 0 for d, t in zip(ids, docs)]


def test_tokenizer_trained_on_a_seeded_sample_is_reproducible_and_depends_on_the_seed(corpus_file, tmp_path):
    from data_prep.tokenizer import _sample, train_tokenizer

    first = train_tokenizer([str(corpus_file)], 512, tmp_path / "a", sample_docs=100, seed=3, progress=False)
    again = train_tokenizer([str(corpus_file)], 512, tmp_path / "b", sample_docs=100, seed=3, progress=False)
    other = train_tokenizer([str(corpus_file)], 512, tmp_path / "c", sample_docs=100, seed=4, progress=False)
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert (first / "tokenizer.json").read_bytes() != (other / "tokenizer.json").read_bytes()
    picked = [t for batch in _sample(iter([[str(i) for i in range(500)], [str(i) for i in range(500, 1000)]]), 50, 3)
              for t in batch]
    assert len(picked) == 50 and picked == sorted(picked, key=int) and int(picked[-1]) > 500


def test_long_documents_tokenized_in_pieces_give_the_whole_documents_tokens(tokenizer_dir, gpt2_tokenizer_dir,
                                                                           corpus_file):
    from data_prep.encode import DocumentEncoder, one_tokenizer_thread, pieces

    docs = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").splitlines()[:300]]
    long_docs = ["\n".join(docs[k:k + 60]) for k in range(0, 300, 60)] + ["x" * 10_000, "", "a\nb"]
    # Indented code, whose lines mostly start with spaces (one of them, pydoc's topics, is a 756 KB dict of
    # indented string literals), and whitespace of every kind around newlines.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in ("pydoc_data/topics.py", "inspect.py")]
    long_docs += code + ["é\n  b\r\n\tc  \n\nd" * 50, "x \n y\x1c\nz\x85\n\u00a0\n\u3000q\n'\ns\n1\n2" * 50]
    cut = pieces(long_docs[0], 2000)
    assert len(cut) > 50 and "".join(cut) == long_docs[0] and max(map(len, cut)) <= 2000
    assert max(map(len, pieces(code[0], 2000))) <= 2000  # indented code has cut points too
    assert pieces("x" * 10_000, 2000) == ["x" * 10_000]  # no cut point: one piece
    for folder in (tokenizer_dir, gpt2_tokenizer_dir):
        with one_tokenizer_thread():
            whole = DocumentEncoder(str(folder), 0, 0, 0.1, piece_chars=1 << 40).encode(0, long_docs)
            in_pieces = DocumentEncoder(str(folder), 0, 0, 0.1, piece_chars=2000).encode(0, long_docs)
        assert np.array_equal(whole.tokens, in_pieces.tokens) and whole.tokens.size > 100_000
        assert np.array_equal(whole.lengths, in_pieces.lengths) and np.array_equal(whole.is_val, in_pieces.is_val)

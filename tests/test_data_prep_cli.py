"""The data_prep commands as users run them: real subprocesses, `--help`, exit codes, SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.shard import shard_corpus

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("corpora", "tokenizer", "shard", "verify")


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_DATASETS_CACHE": str(tmp / "hf_cache"), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], tmp: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env(tmp), capture_output=True, text=True,
                          timeout=300, check=False, **kwargs)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_every_command_has_help_and_corpora_prints_the_path_it_wrote(tmp_path):
    for command in COMMANDS:
        result = run([f"data_prep.{command}", "--help"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"usage: python -m data_prep.{command}" in result.stdout
    result = run(["data_prep.corpora", "shakespeare", "--out", str(tmp_path / "raw")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "raw" / "shakespeare.jsonl")
    assert len((tmp_path / "raw" / "shakespeare.jsonl").read_text().splitlines()) == 1873


@pytest.mark.slow
def test_bad_input_on_the_command_line_is_one_error_line_and_exit_code_2(tokenizer_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    result = run(["data_prep.shard", "--input", str(tmp_path / "bad.txt"), "--tokenizer", str(tokenizer_dir),
                  "--out", str(tmp_path / "out"), "--no-progress"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'bad.txt'} line 2 is not valid UTF-8 (byte 0xff at column 1); convert the file "
        f"to UTF-8, e.g. with iconv")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_same_shards_as_an_uninterrupted_run(corpus_file, tokenizer_dir,
                                                                                 tmp_path, datasets_cache):
    settings = {"val_fraction": 0.05, "seed": 0, "shard_tokens": 20_000, "streaming": True}
    corpus = tmp_path / "first_1000.jsonl"  # 4 batches of 256 documents
    corpus.write_text("\n".join(corpus_file.read_text(encoding="utf-8").splitlines()[:1000]) + "\n", encoding="utf-8")
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "data_prep.shard", "--input", str(corpus), "--tokenizer", str(tokenizer_dir),
            "--out", str(out), "--val-fraction", "0.05", "--seed", "0", "--shard-tokens", "20000", "--streaming",
            "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill once a checkpoint past the first batch (256 of 1,000 documents) is on disk.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run finished before it could be killed"
            progress = out / "progress.json"
            if progress.is_file() and json.loads(progress.read_text())["docs_done"] >= 256:
                break
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9
    assert not (out / "manifest.json").exists()
    docs_done = json.loads((out / "progress.json").read_text())["docs_done"]
    assert 256 <= docs_done < 1000
    assert len(list(out.glob("train_*.bin"))) >= 10

    rerun = subprocess.run(args, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out} after document {docs_done}" in rerun.stderr

    shard_corpus([str(corpus)], str(tokenizer_dir), str(tmp_path / "uninterrupted"), progress=False,
                 cache_dir=str(datasets_cache), **settings)
    assert folder_bytes(out) == folder_bytes(tmp_path / "uninterrupted")
    assert len(folder_bytes(out)) > 45  # ~47 train shards + 3 val shards + manifest

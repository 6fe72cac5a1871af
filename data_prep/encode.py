"""Documents → token ids + a train/val decision, in batches, in one process or many.

The val split is held out by document with a rule that needs no global view of the corpus, so it
gives the same answer streaming or not, in any number of processes, in any batch size:
a document is in val iff  blake2b-64(seed, text) < val_fraction · 2^64.
Because the rule looks at the text, exact duplicate documents always land in the same split (no
train/val leakage through duplicates). The val share is `val_fraction` in expectation, not exactly.

Documents are encoded as plain text: a literal "<|endoftext|>" inside a document is split into
ordinary tokens (`split_special_tokens=True`), so only `data_prep.shard` ever writes EOS. An empty
document has no tokens and gets no EOS.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.inputs import MissingTextError

_TOKENIZERS: dict[str, object] = {}  # one loaded tokenizer per process and folder


@dataclass
class EncodedBatch:
    """A batch of documents: their tokens (EOS appended) laid end to end."""

    tokens: np.ndarray  # uint32 (sum(lengths),)
    lengths: np.ndarray  # int64 (docs,): tokens per document, EOS included; 0 for an empty document
    is_val: np.ndarray  # bool (docs,)


def in_val_split(text: str, seed: int, val_fraction: float) -> bool:
    """The document-level hold-out rule (see the module docstring)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2**64


class DocumentEncoder:
    """Picklable (it holds only a folder path), so `datasets.map` can hash it and ship it to workers."""

    def __init__(self, tokenizer_dir: str, eos_token_id: int, seed: int, val_fraction: float) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.val_fraction = val_fraction

    def _tokenizer(self):
        if self.tokenizer_dir not in _TOKENIZERS:
            from dist_train.formats.tokenizer_folder import load_tokenizer

            _TOKENIZERS[self.tokenizer_dir] = load_tokenizer(self.tokenizer_dir)
        return _TOKENIZERS[self.tokenizer_dir]

    def _ids(self, texts: list, first_row: int) -> tuple[list[list[int]], list[bool]]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise MissingTextError.at(first_row + i, text)
        ids = self._tokenizer()(texts, add_special_tokens=False, split_special_tokens=True,
                                return_attention_mask=False)["input_ids"]
        ids = [doc + [self.eos_token_id] if text else [] for doc, text in zip(ids, texts)]
        return ids, [bool(text) and in_val_split(text, self.seed, self.val_fraction) for text in texts]

    def __call__(self, texts: list, rows: list[int], row_offset: int = 0) -> dict:
        """The `datasets.map(batched=True, with_indices=True)` form; rows count within one part."""
        ids, is_val = self._ids(texts, row_offset + (rows[0] if rows else 0))
        return {"input_ids": ids, "is_val": is_val}

    def encode(self, first_row: int, texts: list) -> EncodedBatch:
        """The streaming form: one flat array, cheap to send between processes."""
        ids, is_val = self._ids(texts, first_row)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter((t for doc in ids for t in doc), dtype=np.uint32, count=int(lengths.sum()))
        return EncodedBatch(tokens, lengths, np.asarray(is_val, dtype=bool))


def _encode_job(args: tuple[DocumentEncoder, int, list]) -> EncodedBatch:
    encoder, first_row, texts = args
    return encoder.encode(first_row, texts)


def encode_stream(batches: Iterator[tuple[int, list]], encoder: DocumentEncoder,
                  num_proc: int) -> Iterator[EncodedBatch]:
    """Encode (first_row, texts) batches in order, in `num_proc` processes.

    At most 2·num_proc batches are in flight, so memory stays flat however long the stream is
    (`Pool.imap` would read the whole input ahead).
    """
    if num_proc <= 1:
        for first_row, texts in batches:
            yield encoder.encode(first_row, texts)
        return
    with multiprocessing.get_context().Pool(num_proc) as pool:
        pending: deque = deque()
        for first_row, texts in batches:
            pending.append(pool.apply_async(_encode_job, ((encoder, first_row, texts),)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

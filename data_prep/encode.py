"""Documents → token ids + a train/val decision, in batches, in one process or many.

The val split is held out by document with a rule that needs no global view of the corpus, so it
gives the same answer streaming or not, in any number of processes, in any batch size:
a document is in val iff  blake2b-64(seed, text) < val_fraction · 2^64.
Because the rule looks at the text, exact duplicate documents always land in the same split (no
train/val leakage through duplicates). The val share is `val_fraction` in expectation, not exactly.

Documents are encoded by the Rust tokenizer (`data_prep.rust_tokenizer`) as plain text: a literal
"<|endoftext|>" inside a document is split into ordinary tokens, so only `data_prep.shard` ever writes EOS. An empty
document has no tokens and gets no EOS.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_prep.inputs import MissingTextError
from data_prep.rust_tokenizer import load_rust_tokenizer

_TOKENIZERS: dict[str, object] = {}  # one loaded Rust tokenizer per process and folder


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


@contextlib.contextmanager
def one_tokenizer_thread() -> Iterator[None]:
    """Make `encode_batch_fast` use one thread in this process (tokenizers reads the variable per call).

    Parallelism comes from `num_proc` processes instead: the Rust call holds the GIL, so a process whose
    tokenizer used every core could not read the next batch meanwhile.
    """
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


# A long document is tokenized in pieces cut where a GPT-2-style byte-level pre-tokenizer always splits: between
# a character that is not whitespace and a newline. No alternative of the GPT-2 pattern matches both (letters,
# numbers and symbols exclude whitespace; whitespace runs exclude the rest), so no pre-token (and no BPE token)
# crosses that point, and the run of whitespace that starts at the newline is the same pre-token(s) at the start
# of a piece as inside the document: the pieces' tokens joined are the document's tokens. (An earlier rule also
# wanted a printable character after the newline, which indented code rarely has: a 756 KB module of the
# standard library had no cut point, and its 190 k tokens at once lifted peak memory by 60 MB.) The Rust
# encoding holds ~370 bytes per token while it is built (measured: 8 MB of text → 900 MB), so a whole 1 GB document
# would need ~100 GB; in pieces of `PIECE_CHARS` it needs one piece's worth at a time.
PIECE_CHARS = 1 << 18  # characters: the Rust encoding of a piece holds ~370 bytes per token (~30 MB)
_CUT = re.compile(r"(?<=\S)(?=\n)")


def _cuttable(tok) -> bool:
    """Whether cutting at `_CUT` leaves the tokens unchanged: a byte-level BPE splitting with the GPT-2 regex,
    no prefix space, no normalizer, no added token holding a newline."""
    pre = tok.pre_tokenizer
    return (type(pre).__name__ == "ByteLevel" and pre.use_regex and not pre.add_prefix_space
            and tok.normalizer is None
            and not any("\n" in t.content for t in tok.get_added_tokens_decoder().values()))


def pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut at `_CUT` points into pieces of at most `max_chars` where it can be (at least half that)."""
    out, start = [], 0
    while len(text) - start > max_chars:
        cut = None
        for match in _CUT.finditer(text, start + max_chars // 2, start + max_chars):
            cut = match.start()
        if cut is None:  # no cut point in reach: the next one, however far
            match = _CUT.search(text, start + max_chars)
            if match is None:
                break
            cut = match.start()
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


class DocumentEncoder:
    """Picklable (it holds only a folder path and numbers), so it can be shipped to worker processes."""

    def __init__(self, tokenizer_dir: str, eos_token_id: int, seed: int, val_fraction: float,
                 piece_chars: int = PIECE_CHARS) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.val_fraction = val_fraction
        self.piece_chars = piece_chars

    def _tokenizer(self):
        if self.tokenizer_dir not in _TOKENIZERS:
            tok = load_rust_tokenizer(self.tokenizer_dir)[0]
            _TOKENIZERS[self.tokenizer_dir] = (tok, _cuttable(tok))
        return _TOKENIZERS[self.tokenizer_dir]

    def _token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' token ids end to end (uint32) and tokens per text; long texts go in pieces."""
        tok, cuttable = self._tokenizer()
        owner, parts = [], []
        for i, text in enumerate(texts):
            split = pieces(text, self.piece_chars) if cuttable and len(text) > self.piece_chars else [text]
            owner += [i] * len(split)
            parts += split
        flat, lengths, lo = [], [], 0
        while lo < len(parts):  # groups of at most piece_chars characters (or one longer piece)
            hi, chars = lo + 1, len(parts[lo])
            while hi < len(parts) and chars + len(parts[hi]) <= self.piece_chars:
                chars += len(parts[hi])
                hi += 1
            ids = [e.ids for e in tok.encode_batch_fast(parts[lo:hi], add_special_tokens=False)]
            counts = list(map(len, ids))
            flat.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=sum(counts)))
            lengths += counts
            lo = hi
        per_text = np.bincount(np.asarray(owner, dtype=np.int64), weights=np.asarray(lengths, dtype=np.float64),
                               minlength=len(texts)).astype(np.int64)
        return (np.concatenate(flat) if flat else np.empty(0, dtype=np.uint32)), per_text

    def encode(self, first_row: int, texts: list) -> EncodedBatch:
        """Token ids of a batch as one flat array (EOS after every non-empty document), cheap to send."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise MissingTextError.at(first_row + i, text)
        ids, per_text = self._token_ids(texts)
        nonempty = np.fromiter(map(bool, texts), dtype=bool, count=len(texts))
        lengths = per_text + nonempty
        ends = np.cumsum(lengths)
        tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint32)
        is_text = np.ones(tokens.size, dtype=bool)
        is_text[ends[nonempty] - 1] = False
        tokens[is_text] = ids
        tokens[~is_text] = self.eos_token_id
        is_val = [bool(text) and in_val_split(text, self.seed, self.val_fraction) for text in texts]
        return EncodedBatch(tokens, lengths, np.asarray(is_val, dtype=bool))


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a worker process is one tokenizer thread


def _encode_job(args: tuple[DocumentEncoder, int, list]) -> EncodedBatch:
    encoder, first_row, texts = args
    return encoder.encode(first_row, texts)


def encode_stream(batches: Iterator[tuple[int, list]], encoder: DocumentEncoder,
                  num_proc: int) -> Iterator[EncodedBatch]:
    """Encode (first_row, texts) batches in order: here (num_proc 1) or in `num_proc` worker processes.

    One tokenizer thread per process. With workers, this process reads and writes while they encode, and at
    most 2·num_proc batches are in flight, so memory stays flat however long the stream is (`Pool.imap`
    would read the whole input ahead).
    """
    if num_proc <= 1:
        with one_tokenizer_thread():
            for first_row, texts in batches:
                yield encoder.encode(first_row, texts)
        return
    with multiprocessing.get_context().Pool(num_proc, initializer=_init_worker) as pool:
        pending: deque = deque()
        for first_row, texts in batches:
            pending.append(pool.apply_async(_encode_job, ((encoder, first_row, texts),)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

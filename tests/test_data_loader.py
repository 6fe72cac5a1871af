"""TokenLoader over real shard folders made by data_prep (the session's `shard_dir` and a second source)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.shard import shard_corpus
from dist_train.data.loader import TokenLoader, _Permutation
from dist_train.formats.manifest import ManifestError, read_manifest

SEQ = 64


def split_tokens(folder: Path, split: str) -> np.ndarray:
    manifest = read_manifest(folder)
    return np.concatenate([np.fromfile(folder / s["path"], dtype=np.uint16)
                           for s in manifest["splits"][split]["shards"]]).astype(np.int64)


def batches(loader: TokenLoader, steps: int) -> list[np.ndarray]:
    return [loader.next_batch()[0].numpy() for _ in range(steps)]


@pytest.fixture(scope="module")
def second_source(tmp_path_factory, corpus_file, tokenizer_dir, datasets_cache) -> Path:
    """A second shard folder with the same tokenizer: the last 300 documents of the corpus."""
    tmp = tmp_path_factory.mktemp("second")
    lines = corpus_file.read_text(encoding="utf-8").splitlines()[-300:]
    (tmp / "tail.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shard_corpus([str(tmp / "tail.jsonl")], str(tokenizer_dir), str(tmp / "shards"), val_fraction=0.1,
                 shard_tokens=100_000, cache_dir=str(datasets_cache), progress=False)
    return tmp / "shards"


def test_samples_are_seq_len_plus_one_token_windows_of_the_split_stream(shard_dir):
    loader = TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 4, 0, 1, seed=0)
    stream = split_tokens(shard_dir, "train")
    assert loader.num_samples == [(len(stream) - 1) // SEQ]
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, SEQ) and str(inputs.dtype) == "torch.int64"
    for j in range(4):
        _, i = loader.sample_index(j)
        window = stream[i * SEQ:i * SEQ + SEQ + 1]
        assert inputs[j].tolist() == window[:-1].tolist() and targets[j].tolist() == window[1:].tolist()
    # A window that crosses from shard 0 into shard 1 (shards hold 500,000 tokens; 500,000 / 64 = 7812.5).
    assert loader.streams[0].read(7812 * SEQ, SEQ + 1).tolist() == stream[7812 * SEQ:7813 * SEQ + 1].tolist()


def test_two_ranks_read_disjoint_samples_that_together_equal_the_one_rank_stream(shard_dir):
    steps, micro = 50, 4
    ranks = [TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, micro, r, 2, seed=3) for r in range(2)]
    single = TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 2 * micro, 0, 1, seed=3)
    seen: set[tuple[int, int]] = set()
    for step in range(steps):
        ids = [{ranks[r].sample_index(step * 2 * micro + r * micro + j) for j in range(micro)} for r in range(2)]
        assert not ids[0] & ids[1]
        seen |= ids[0] | ids[1]
        both = np.concatenate([ranks[0].next_batch()[0].numpy(), ranks[1].next_batch()[0].numpy()])
        assert np.array_equal(both, single.next_batch()[0].numpy())
    assert len(seen) == steps * 2 * micro  # no sample twice within the epoch
    assert ranks[0].consumed == ranks[1].consumed == steps * 2 * micro


def test_an_epoch_reads_every_sample_once_and_the_next_epoch_in_a_new_order(shard_dir):
    loader = TokenLoader([(str(shard_dir), 1.0)], "val", SEQ, 1, 0, 1, seed=0)
    n = loader.num_samples[0]
    first = [loader.sample_index(g)[1] for g in range(n)]
    second = [loader.sample_index(g)[1] for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n))


def test_feistel_permutation_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 5, 17, 1000, 4097):
        assert sorted(map(_Permutation(n, key=11), range(n))) == list(range(n))


def test_state_dict_round_trip_resumes_the_identical_sample_stream(shard_dir):
    loader = TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 4, 1, 2, seed=5)
    batches(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = batches(loader, 5)
    resumed = TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 4, 1, 2, seed=5)
    resumed.load_state_dict(state)
    assert state["consumed_samples"] == 7 * 4 * 2
    assert all(np.array_equal(a, b) for a, b in zip(batches(resumed, 5), expected))


def test_resume_on_another_world_size_with_the_same_global_batch_reads_the_same_step(shard_dir):
    source = [(str(shard_dir), 1.0)]
    # World 2 × micro 2 × accum 2 = global batch 8; three steps, then the fourth step for reference.
    old = [TokenLoader(source, "train", SEQ, 2, r, 2, seed=1) for r in range(2)]
    for _ in range(3 * 2):
        for loader in old:
            loader.next_batch()
    state = old[0].state_dict()
    step4 = np.concatenate([b for _ in range(2) for loader in old for b in [loader.next_batch()[0].numpy()]])
    # Resume on world 1 × micro 4 × accum 2 = global batch 8.
    new = TokenLoader(source, "train", SEQ, 4, 0, 1, seed=1)
    new.load_state_dict(state)
    resumed4 = np.concatenate([new.next_batch()[0].numpy() for _ in range(2)])
    assert sorted(map(bytes, step4)) == sorted(map(bytes, resumed4))


def test_mixing_two_sources_0_7_0_3_gives_their_weights_within_2_percent_over_10k_samples(shard_dir,
                                                                                          second_source):
    sources = [(str(shard_dir), 0.7), (str(second_source), 0.3)]
    loader = TokenLoader(sources, "train", SEQ, 8, 0, 1, seed=0)
    picks = np.array([loader.sample_index(g)[0] for g in range(10_000)])
    assert abs((picks == 0).mean() - 0.7) < 0.02
    assert abs((picks[:1000] == 0).mean() - 0.7) < 0.02  # also early in the run
    streams = [split_tokens(Path(p), "train") for p, _ in sources]
    for g in range(0, 10_000, 997):  # the window really comes from the picked source
        source, i = loader.sample_index(g)
        assert loader.window(g).tolist() == streams[source][i * SEQ:i * SEQ + SEQ + 1].tolist()
    # Within its epoch the second source never repeats a sample.
    second = [loader.sample_index(g)[1] for g in range(10_000) if picks[g] == 1]
    assert len(second) < loader.num_samples[1]
    assert len(set(second)) == len(second)


def test_validation_loader_gives_the_same_batches_after_reset_and_when_rebuilt(shard_dir):
    loader = TokenLoader([(str(shard_dir), 1.0)], "val", SEQ, 4, 0, 1, seed=0)
    first = batches(loader, 3)
    loader.reset()
    again = batches(loader, 3)
    rebuilt = batches(TokenLoader([(str(shard_dir), 1.0)], "val", SEQ, 4, 0, 1, seed=0), 3)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first, again, rebuilt))


def test_resuming_with_another_seed_or_mixture_is_refused(shard_dir, second_source):
    loader = TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 4, 0, 1, seed=0)
    batches(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed changed"):
        TokenLoader([(str(shard_dir), 1.0)], "train", SEQ, 4, 0, 1, seed=9).load_state_dict(state)
    mixed = TokenLoader([(str(shard_dir), 0.5), (str(second_source), 0.5)], "train", SEQ, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="sources"):
        mixed.load_state_dict(state)
    mixed.load_state_dict(state, strict=False)
    assert mixed.consumed == 8


# --- damaged data is refused, naming the file -----------------------------------------------------

@pytest.fixture
def shard_copy(shard_dir, tmp_path) -> Path:
    return Path(shutil.copytree(shard_dir, tmp_path / "shards"))


def test_truncated_shard_is_refused_naming_the_file(shard_copy):
    with open(shard_copy / "train_00001.bin", "r+b") as f:
        f.truncate(999_000)
    with pytest.raises(ManifestError, match=r"shard .*train_00001.bin is truncated: 999000 bytes, the "
                                            r"manifest says 1000000"):
        TokenLoader([(str(shard_copy), 1.0)], "train", SEQ, 4, 0, 1, seed=0)


def test_missing_shard_is_refused_naming_the_file(shard_copy):
    (shard_copy / "train_00002.bin").unlink()
    with pytest.raises(ManifestError, match=r"shard .*train_00002.bin is missing"):
        TokenLoader([(str(shard_copy), 1.0)], "train", SEQ, 4, 0, 1, seed=0)


def test_corrupted_shard_is_named_by_the_checksum_check(shard_copy):
    path = shard_copy / "train_00003.bin"
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    TokenLoader([(str(shard_copy), 1.0)], "train", SEQ, 4, 0, 1, seed=0)  # the cheap size check passes
    with pytest.raises(ManifestError, match=r"shard .*train_00003.bin is corrupted: its sha256 differs"):
        TokenLoader([(str(shard_copy), 1.0)], "train", SEQ, 4, 0, 1, seed=0, verify_checksums=True)


def test_malformed_manifest_is_refused_naming_the_file_and_key(shard_copy):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["num_tokens"] += 1
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"manifest.json: `splits.train.num_tokens` is \d+ but its shards hold"):
        TokenLoader([(str(shard_copy), 1.0)], "train", SEQ, 4, 0, 1, seed=0)
    (shard_copy / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match=r"manifest.json is not valid JSON"):
        read_manifest(shard_copy)


def test_sources_made_with_different_tokenizers_are_refused(shard_dir, gpt2_tokenizer_dir, corpus_file,
                                                            tmp_path, datasets_cache):
    (tmp_path / "docs.jsonl").write_text("\n".join(corpus_file.read_text().splitlines()[:30]) + "\n")
    shard_corpus([str(tmp_path / "docs.jsonl")], str(gpt2_tokenizer_dir), str(tmp_path / "gpt2"),
                 val_fraction=0.0, cache_dir=str(datasets_cache), progress=False)
    with pytest.raises(ValueError, match="made with different tokenizers"):
        TokenLoader([(str(shard_dir), 0.5), (str(tmp_path / "gpt2"), 0.5)], "train", SEQ, 4, 0, 1, seed=0)


def test_split_shorter_than_one_sequence_is_refused_with_the_fix(shard_dir):
    val_tokens = read_manifest(shard_dir)["splits"]["val"]["num_tokens"]
    with pytest.raises(ValueError, match=rf"the val split has {val_tokens} tokens, fewer than seq_len \+ 1"):
        TokenLoader([(str(shard_dir), 1.0)], "val", val_tokens, 1, 0, 1, seed=0)

"""Tensor parallelism (DeepSpeed AutoTP) and sequence parallelism (DeepSpeed-Ulysses): the refusals of layouts
that cannot work, and real multi-process runs on the CPU whose losses equal one process's."""

from __future__ import annotations

from pathlib import Path


import pytest
import torch
from distributed_helpers import REPO
from resume_helpers import (
    checkpoint,
    command,
    kill_tree,
    logged_step,
    losses,
    optimizer_tensors,
    overrides,
    run,
    shared_run,
    start,
    tail,
    wait_until,
)

from dist_train.config import ConfigError, load_config
from dist_train.engine.ds_config import deepspeed_config
from dist_train.train.preflight import preflight

TINY = REPO / "configs" / "tiny.yaml"  # n_heads 4, n_kv_heads 2, seq_len 128


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    return str(e.value)


def preflight_refused(overrides: list[str], world_size: int) -> str:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as e:
        preflight(cfg, world_size)
    return str(e.value)


def test_tensor_size_that_does_not_divide_the_kv_heads_is_refused():
    message = refused(["parallel.tensor=4"])
    assert "parallel.tensor=4 does not divide the model's 2 key/value heads" in message
    assert "model.n_heads, model.n_kv_heads" in message and "set parallel.tensor to a divisor of 2" in message


def test_sequence_size_that_does_not_divide_the_heads_is_refused():
    message = refused(["parallel.sequence=3"])
    assert "parallel.sequence=3 does not divide the model's 4 attention heads" in message


def test_seq_len_not_divisible_by_the_sequence_size_is_refused():
    message = refused(["parallel.sequence=2", "model.seq_len=127"])
    assert "model.seq_len (127) is not divisible by parallel.sequence (2)" in message
    assert "set model.seq_len to a multiple of 2" in message


def test_tensor_parallelism_with_zero3_is_refused():
    message = refused(["parallel.tensor=2", "deepspeed.zero_stage=3"])
    assert "parallel.tensor=2 needs deepspeed.zero_stage 0, 1 or 2" in message
    assert "set deepspeed.zero_stage=2" in message


def test_tensor_and_sequence_parallelism_together_are_refused():
    message = refused(["parallel.tensor=2", "parallel.sequence=2"])
    assert "parallel.tensor=2 with parallel.sequence=2" in message and "parallel.sequence=1" in message


def test_world_size_not_divisible_by_the_model_parallel_groups_is_refused(shard_dir):
    message = preflight_refused([f"data.path={shard_dir}", "parallel.tensor=2"], world_size=3)
    assert ("the world size (3 processes) is not divisible by parallel.tensor (2) x parallel.sequence (1) = 2"
            in message)


def test_hf_config_heads_not_divisible_by_the_tensor_size_are_refused(shard_dir, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                vocab_size=2048, max_position_embeddings=256).save_pretrained(tmp_path)
    message = preflight_refused([f"data.path={shard_dir}", f"model.hf_config={tmp_path}", "parallel.tensor=2"],
                                world_size=2)
    assert "parallel.tensor=2 does not divide the model's 3 attention heads" in message
    assert f"num_attention_heads, num_key_value_heads in {tmp_path}" in message


def test_sequence_parallelism_of_an_hf_model_without_sdpa_attention_is_refused(shard_dir, tmp_path):
    from transformers import BloomConfig

    BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=2048).save_pretrained(tmp_path)
    message = preflight_refused([f"data.path={shard_dir}", f"model.hf_config={tmp_path}", "parallel.sequence=2"],
                                world_size=2)
    assert "parallel.sequence=2: BloomForCausalLM" in message and "has no sdpa attention" in message
    assert "set parallel.sequence=1" in message


def test_generated_deepspeed_config_counts_data_parallel_ranks_and_shards_our_layers():
    cfg = load_config(TINY, ["parallel.tensor=2", "train.micro_batch_size=4", "train.global_batch_size=16"])
    ds = deepspeed_config(cfg, world_size=4)  # 2 data-parallel ranks
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    specs = ds["tensor_parallel"]["partition_config"]["layer_specs"]
    assert ds["tensor_parallel"]["autotp_size"] == 2 and [s["partition_type"] for s in specs] == ["column", "row"]
    sp = deepspeed_config(load_config(TINY, ["parallel.sequence=2", "train.micro_batch_size=4",
                                             "train.global_batch_size=16"]), world_size=4)
    assert sp["train_batch_size"] == 16 and sp["gradient_accumulation_steps"] == 2 and "tensor_parallel" not in sp


# ---------------------------------------------------------------------------------------------------------------
# Real runs: fp32, the 2-layer tiny model, global batch 8 sequences at every layout, 10 steps, checkpoints at 5, 10.

STEPS = 10
TEN_STEPS = ("train.max_steps=10", "checkpoint.every=5")
TP2 = (*TEN_STEPS, "parallel.tensor=2")
SP2 = (*TEN_STEPS, "parallel.sequence=2")


@pytest.fixture(scope="module")
def single(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_x1", 1, *TEN_STEPS)


@pytest.fixture(scope="module")
def tensor2(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_tp2", 2, *TP2)


@pytest.fixture(scope="module")
def sequence2(tmp_path_factory, shard_dir) -> Path:
    return shared_run(tmp_path_factory, shard_dir, "parallel_sp2", 2, *SP2)


def assert_losses_equal(run_dir: Path, reference: Path) -> None:
    ours, theirs = losses(run_dir), losses(reference)
    print(f"losses {run_dir.name}: {ours}\nlosses {reference.name}: {theirs}")
    assert sorted(ours) == list(range(1, STEPS + 1)) and sorted(theirs) == sorted(ours)
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step


def module_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every model-parallel rank's module state (a TP rank holds its shards)."""
    out = {}
    for path in sorted(ckpt.glob("mp_rank_*_model_states.pt")):
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        out.update({f"{path.name}:{name}": tensor for name, tensor in module.items()})
    return out


@pytest.mark.slow
def test_tensor_parallel_losses_equal_one_process(single, tensor2):
    assert_losses_equal(tensor2, single)
    ckpt = checkpoint(tensor2, STEPS)
    shards = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"] for r in (0, 1)]
    q = "blocks.0.attn.q_proj.weight"
    assert shards[0][q].shape == (64, 128) and not torch.equal(shards[0][q], shards[1][q]), "q_proj is split"
    assert shards[0]["blocks.0.attn.o_proj.weight"].shape == (128, 64), "o_proj is split by input columns"
    assert torch.equal(shards[0]["norm_f.weight"], shards[1]["norm_f.weight"]), "norms stay whole"


@pytest.mark.slow
def test_sequence_parallel_losses_equal_one_process(single, sequence2):
    assert_losses_equal(sequence2, single)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.sequence=2"])
def test_four_processes_with_two_data_parallel_groups_equal_one_process(single, shard_dir, tmp_path, layout):
    assert run(command(overrides(shard_dir, tmp_path, *TEN_STEPS, layout), nproc=4), tmp_path / "train.log") == 0, \
        tail(tmp_path / "train.log")
    assert_losses_equal(tmp_path, single)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor", "sequence"])
def test_kill_and_resume_matches_uninterrupted_run_bit_for_bit(request, shard_dir, tmp_path, layout):
    reference = request.getfixturevalue(f"{layout}2")
    cmd, log = command(overrides(shard_dir, tmp_path, *(TP2 if layout == "tensor" else SP2)), nproc=2), \
        tmp_path / "train.log"
    proc = start(cmd, log)
    wait_until(lambda: logged_step(tmp_path) >= 7, proc)  # past the checkpoint at step 5
    kill_tree(proc)
    assert run(cmd, log) == 0, tail(log)
    assert "resumed from" in log.read_text()
    assert losses(tmp_path) == losses(reference)
    ours, theirs = module_tensors(checkpoint(tmp_path, STEPS)), module_tensors(checkpoint(reference, STEPS))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    oa, ob = optimizer_tensors(checkpoint(tmp_path, STEPS)), optimizer_tensors(checkpoint(reference, STEPS))
    assert oa.keys() == ob.keys()
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key
    print(f"{layout}: {len(ours)} weight tensors and {len(oa)} optimizer tensors identical after the kill")

"""Tensor parallelism (DeepSpeed AutoTP) and sequence parallelism (DeepSpeed-Ulysses): the refusals of layouts
that cannot work, and real multi-process runs on the CPU whose losses equal one process's."""

from __future__ import annotations


import pytest
from distributed_helpers import REPO

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

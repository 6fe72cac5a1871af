"""Bad configs are refused before launch with a message that names the key and the fix."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO

from dist_train.config import Config, ConfigError, SourceConfig, load_config
from dist_train.config.validation import RANGES
from dist_train.engine.ds_config import deepspeed_config
from dist_train.train.preflight import preflight

CONFIGS = REPO / "configs"


def refused(overrides: list[str], path: Path | None = CONFIGS / "tiny.yaml") -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_tiny_config_loads_with_typed_overrides():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-3", "model.n_layers=3", "wandb.tags=[a, b]"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 3
    assert cfg.wandb.tags == ["a", "b"]


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m", "llama-1b", "llama-7b", "moe-tiny", "mixtral-8x1b"])
def test_every_preset_loads(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml", ["data.path=somewhere"])
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_unknown_key_is_named_with_the_closest_valid_key():
    msg = refused(["model.n_layer=2"])
    assert "unknown config key 'model.n_layer'" in msg and "did you mean 'model.n_layers'" in msg


def test_an_error_names_the_override_that_set_the_key_or_else_the_yaml_file(tmp_path):
    assert refused(["train.lr=1e-3", "model.n_layer=2"]).startswith("override model.n_layer=2: unknown config key")
    assert refused(["train.max_steps=10", "train.max_steps=ten"]).startswith("override train.max_steps=ten: ")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_step: 10\n")
    assert refused(["train.lr=1e-3"], bad_yaml).startswith(f"{bad_yaml}: unknown config key 'train.max_step'")


def test_unknown_section_is_named():
    assert "did you mean 'train'" in refused(["trian.lr=1"])


def test_wrong_type_is_named():
    msg = refused(["train.max_steps=ten"])
    assert "train.max_steps" in msg and "expected an integer" in msg
    assert "expected true or false" in refused(["model.bias=3"])


def test_d_model_not_divisible_by_n_heads():
    msg = refused(["model.d_model=130", "model.n_heads=4"])
    assert "model.d_model (130) must be divisible by model.n_heads (4)" in msg


def test_n_heads_not_divisible_by_n_kv_heads():
    msg = refused(["model.n_heads=4", "model.n_kv_heads=3"])
    assert "model.n_heads (4) must be divisible by model.n_kv_heads (3)" in msg


@pytest.mark.parametrize("stage", [-1, 4])
def test_zero_stage_outside_0_to_3(stage):
    assert "deepspeed.zero_stage must be 0, 1, 2 or 3" in refused([f"deepspeed.zero_stage={stage}"])


def test_min_lr_above_lr():
    assert "train.min_lr (0.1) must be between 0 and train.lr (0.001)" in refused(["train.lr=1e-3",
                                                                                    "train.min_lr=0.1"])


def test_missing_data_path():
    assert "data.path is missing" in refused(["data.path=null"])


def test_enum_value_lists_the_choices():
    assert "precision: 'fp8' is not one of bf16, fp16, fp32" in refused(["precision=fp8"])


def test_missing_config_file_is_named(tmp_path):
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in refused([], tmp_path / "nope.yaml")


def test_global_batch_that_does_not_divide_is_refused():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.micro_batch_size=4", "train.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"not divisible by train.micro_batch_size \(4\) x data-parallel size \(2\)"):
        deepspeed_config(cfg, world_size=2)
    assert deepspeed_config(cfg, world_size=3)["gradient_accumulation_steps"] == 1


def test_deepspeed_config_is_generated_from_ours():
    cfg = load_config(CONFIGS / "tiny.yaml", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                              "precision=bf16", "train.grad_accum_steps=4"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == cfg.train.grad_clip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_cuda_is_refused_where_the_cpu_has_no_fp16(shard_dir, monkeypatch):
    """DeepSpeed takes fp16 on a CPU whose oneDNN has fp16 arithmetic (this machine's has); on others it refuses
    it at engine build, after the processes started. The probe is replaced: no CPU without it is at hand."""
    from dist_train.train import preflight as checks

    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={shard_dir}", "precision=fp16"])
    monkeypatch.setattr(checks, "cpu_runs_fp16", lambda: False)
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU or a CPU with fp16 arithmetic"):
        preflight(cfg, world_size=1)


def test_seq_len_longer_than_the_data_is_refused(shard_dir):
    val_tokens = json.loads((Path(shard_dir) / "manifest.json").read_text())["splits"]["val"]["num_tokens"]
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={shard_dir}", f"model.seq_len={val_tokens + 10}"])
    with pytest.raises(ConfigError, match=r"model.seq_len \(\d+\) is longer than the val split"):
        preflight(cfg, world_size=1)


def test_seq_len_longer_than_the_models_positions_is_refused(shard_dir, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, vocab_size=4096).save_pretrained(tmp_path)
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={shard_dir}", f"model.hf_config={tmp_path}",
                                              "model.seq_len=128"])
    with pytest.raises(ConfigError, match=r"model.seq_len \(128\) is longer than the model's positions \(64"):
        preflight(cfg, world_size=1)


def test_vocabulary_smaller_than_the_tokenizers_is_refused(shard_dir):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={shard_dir}", "model.vocab_size=100"])
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the tokenizer's vocabulary"):
        preflight(cfg, world_size=1)


def test_data_path_that_does_not_exist_is_refused(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="data.path: .*missing does not exist; make it with"):
        preflight(cfg, world_size=1)


def test_bad_config_is_refused_before_any_process_starts(tmp_path):
    """The launcher entry exits 2 with the message, and writes no run folder."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config",
                           str(CONFIGS / "tiny.yaml"), "model.n_layer=2", f"run.out_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'model.n_layers'" in proc.stderr
    assert not out.exists()


def test_hf_config_vocabulary_smaller_than_the_tokenizers_is_refused(shard_dir, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=1000, max_position_embeddings=256).save_pretrained(tmp_path)
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={shard_dir}", f"model.hf_config={tmp_path}"])
    with pytest.raises(ConfigError, match=r"vocab_size in .* \(1000\) is smaller than the tokenizer's vocabulary"):
        preflight(cfg, world_size=1)


def test_qk_norm_with_an_hf_config_is_refused_naming_both_keys(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=2048).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="the transformers config decides its attention") as e:
        load_config(CONFIGS / "tiny.yaml", ["data.path=unused", f"model.hf_config={tmp_path}", "model.qk_norm=true"])
    assert set(e.value.keys) == {"model.qk_norm", "model.hf_config"}


def numeric_fields(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every int or float field of the schema (None allowed or not) by dotted key; `data.sources.weight` for
    the fields of each data source."""
    found = {}
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if typing.get_origin(inner[0]) is list and typing.get_args(inner[0]) == (SourceConfig,):
            found.update(numeric_fields(SourceConfig, f"{key}."))
        elif dataclasses.is_dataclass(inner[0]):
            found.update(numeric_fields(inner[0], f"{key}."))
        elif inner[0] in (int, float):
            found[key] = inner[0]
    return found


def field_docstrings() -> dict[str, str]:
    """The docstring under each field of dist_train/config/schema.py, by ClassName.field."""
    tree = ast.parse((REPO / "dist_train" / "config" / "schema.py").read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for a, b in zip(cls.body, cls.body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[f"{cls.name}.{a.target.id}"] = b.value.value
    return docs


SECTION_CLASSES = {"model": "ModelConfig", "model.moe": "MoEConfig", "data.sources": "SourceConfig",
                   "data": "DataConfig", "train": "TrainConfig", "deepspeed": "DeepSpeedConfig",
                   "checkpoint": "CheckpointConfig", "parallel": "ParallelConfig", "eval": "EvalConfig"}


def test_every_numeric_field_has_a_range_that_its_docstring_states():
    assert set(numeric_fields()) == set(RANGES), "a numeric config field without a range in RANGES (or a stale one)"
    docs = field_docstrings()
    for key, allowed in RANGES.items():
        section, name = key.rsplit(".", 1)
        doc = docs[f"{SECTION_CLASSES[section]}.{name}"]
        assert f"range {allowed.describe()}" in " ".join(doc.split()), f"{key}: docstring does not state its range"


def out_of_range_values() -> list[tuple[str, object]]:
    """Per field, the value just outside its range at each end that has one."""
    cases = []
    for key, allowed in RANGES.items():
        kind = numeric_fields()[key]
        step = 1 if kind is int else 0.5
        if allowed.low is not None:
            cases.append((key, kind(allowed.low if allowed.low_open else allowed.low - step)))
        if allowed.high is not None:
            cases.append((key, kind(allowed.high if allowed.high_open else allowed.high + step)))
    return cases


@pytest.mark.parametrize(("key", "bad"), out_of_range_values(), ids=lambda v: str(v))
def test_an_out_of_range_value_is_refused_naming_the_override_and_the_range(key, bad):
    if key == "data.sources.weight":
        override = f"data.sources=[{{path: data/x, weight: {bad}}}]"
        msg, key = refused(["data.path=null", override]), "data.sources[0].weight"
    else:
        override = f"{key}={bad}"
        msg = refused([override])
    assert msg.startswith(f"override {override}: {key} must be {RANGES[key.replace('[0]', '')].describe()}, got ")


def test_a_bad_value_in_the_yaml_file_is_blamed_on_the_file(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  weight_decay: -1\n")
    assert refused(["model.seq_len=64"], bad_yaml).startswith(f"{bad_yaml}: train.weight_decay must be >= 0")

"""Checkpoint bookkeeping: what a resume accepts or refuses, cleanup of interrupted saves, and a run whose
loss turns non-finite (skipped, counted, stopped with the last good checkpoint kept)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from resume_helpers import TINY, command, overrides, run, tail

from dist_train.checkpoint.layout import CLIENT_STATE, tag_for
from dist_train.checkpoint.resume import find_checkpoint, plan_resume
from dist_train.checkpoint.verify import write_files_list
from dist_train.checkpoint.weights import checkpoint_weights
from dist_train.config import ConfigError, load_config
from dist_train.distributed.environment import ProcessPlace

PLACE = ProcessPlace(rank=0, local_rank=0, world_size=1, host="test", slurm_node=None, slurm_job_id=None,
                     slurm_restart_count=0)


def fake_checkpoint(run_dir, step, cfg, world_size=1, zero_shards=False):
    """A checkpoint folder as far as resume planning reads it: client_state.json (+ ZeRO shard names)."""
    path = run_dir / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    meta = {"train_state": {"step": step}, "world_size": world_size, "config": cfg.to_dict()}
    (path / CLIENT_STATE).write_text(json.dumps(meta))
    if zero_shards:
        (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    write_files_list(path, {})
    (run_dir / "checkpoints" / "latest").write_text(path.name + "\n")
    return path


def config(tmp_path, *extra):
    return load_config(TINY, [f"data.path={tmp_path}", f"run.out_dir={tmp_path}", *extra])


def test_model_shape_zero_stage_and_precision_changes_are_refused(tmp_path):
    fake_checkpoint(tmp_path, 4, config(tmp_path))
    for change, key in [("model.n_layers=2", "model.n_layers: 4 -> 2"), ("model.d_ff=64", "model.d_ff: 352 -> 64"),
                        ("deepspeed.zero_stage=3", "deepspeed.zero_stage: 1 -> 3"),
                        ("precision=bf16", "precision: 'fp32' -> 'bf16'")]:
        with pytest.raises(ConfigError, match="cannot be resumed") as err:
            plan_resume(tmp_path, config(tmp_path, change), PLACE, "latest")
        assert key in str(err.value)


def test_qk_norm_change_is_refused_and_a_checkpoint_from_before_it_existed_resumes_without_it(tmp_path):
    path = fake_checkpoint(tmp_path, 4, config(tmp_path))
    meta = json.loads((path / CLIENT_STATE).read_text())
    del meta["config"]["model"]["qk_norm"]  # written before model.qk_norm existed
    (path / CLIENT_STATE).write_text(json.dumps(meta))
    write_files_list(path, {})
    assert plan_resume(tmp_path, config(tmp_path, "train.z_loss=1e-4"), PLACE, "latest").path == path
    with pytest.raises(ConfigError, match="cannot be resumed with this config: model.qk_norm: False -> True"):
        plan_resume(tmp_path, config(tmp_path, "model.qk_norm=true"), PLACE, "latest")
    assert config(tmp_path).model_hash() == config(tmp_path, "train.z_loss=1e-4").model_hash() != \
        config(tmp_path, "model.qk_norm=true").model_hash()


def test_seq_len_change_is_refused_for_rotary_and_learned_positions(tmp_path):
    """Learned positions change shape; with either, the loader's saved position counts seq_len windows."""
    learned = ("model.norm=layernorm", "model.pos=learned", "model.mlp=gelu")
    for name, kind in (("rope", ()), ("learned", learned)):
        fake_checkpoint(tmp_path / name, 2, config(tmp_path, *kind))
        with pytest.raises(ConfigError, match="with this config: model.seq_len: 128 -> 64. Restore"):
            plan_resume(tmp_path / name, config(tmp_path, *kind, "model.seq_len=64"), PLACE, "latest")


def test_lr_and_max_steps_changes_are_allowed_and_reported(tmp_path):
    path = fake_checkpoint(tmp_path, 4, config(tmp_path))
    plan = plan_resume(tmp_path, config(tmp_path, "train.lr=0.001", "train.max_steps=400"), PLACE, "latest")
    print(plan.describe())
    assert plan.path == path and not plan.world_changed and not plan.universal
    assert plan.changes == ["train.max_steps: 200 -> 400", "train.lr: 0.003 -> 0.001"]
    assert plan.describe().endswith("config changes: train.max_steps: 200 -> 400; train.lr: 0.003 -> 0.001")


def test_resume_none_latest_and_an_explicit_folder(tmp_path):
    cfg = config(tmp_path)
    assert plan_resume(tmp_path, cfg, PLACE, "latest") is None  # nothing to resume: a fresh start
    assert plan_resume(tmp_path, cfg, PLACE, "none") is None
    fake_checkpoint(tmp_path, 2, cfg)
    fake_checkpoint(tmp_path, 4, cfg)
    assert plan_resume(tmp_path, cfg, PLACE, "latest").path.name == "step_00000004"
    with pytest.raises(ConfigError, match="nowhere does not exist; pass a checkpoint folder .checkpoints of"):
        plan_resume(tmp_path, cfg, PLACE, str(tmp_path / "nowhere"))


def test_starting_over_in_a_folder_with_checkpoints_is_refused(tmp_path):
    cfg = config(tmp_path)
    fake_checkpoint(tmp_path, 4, cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints .latest step_00000004.; start the new run in "
                                          "its own folder"):
        plan_resume(tmp_path, cfg, PLACE, "none")


def test_rolling_back_to_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """A resume from step 2 abandons steps 4 and 6: latest, pruning and averaging must not see them again."""
    cfg = config(tmp_path)
    older = fake_checkpoint(tmp_path, 2, cfg)
    fake_checkpoint(tmp_path, 4, cfg)
    fake_checkpoint(tmp_path, 6, cfg)
    assert plan_resume(tmp_path, cfg, PLACE, str(older)).path == older
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002"]
    assert sorted(p.name for p in (checkpoints / "abandoned").iterdir()) == ["step_00000004", "step_00000006"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"


def test_interrupted_saves_and_deletions_are_cleaned_up_and_latest_is_kept(tmp_path):
    cfg = config(tmp_path)
    fake_checkpoint(tmp_path, 2, cfg)
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".tmp_step_00000004" / "step_00000004").mkdir(parents=True)  # killed while writing
    (checkpoints / ".trash_step_00000000").mkdir()  # killed while pruning
    (checkpoints / "latest.tmp").write_text("step_0000")  # killed while replacing latest
    assert find_checkpoint(tmp_path, "latest", PLACE).name == "step_00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "latest.tmp", "step_00000002"]


def test_a_checkpoint_saved_by_more_processes_is_planned_as_a_universal_load(tmp_path, monkeypatch):
    from dist_train.checkpoint import reshard

    converted = []
    monkeypatch.setattr(reshard, "convert_to_universal", lambda path, trust=False: converted.append(path))
    path = fake_checkpoint(tmp_path / "zero", 2, config(tmp_path), world_size=2, zero_shards=True)
    plan = plan_resume(tmp_path / "zero", config(tmp_path), PLACE, "latest")
    assert plan.world_changed and plan.universal and converted == [path]
    fake_checkpoint(tmp_path / "stage0", 2, config(tmp_path), world_size=2)  # whole tensors: loads as it is
    plan = plan_resume(tmp_path / "stage0", config(tmp_path), PLACE, "latest")
    assert plan.world_changed and not plan.universal
    assert "saved by 2 processes, re-sharded" in plan.describe()


def test_a_global_batch_that_changes_with_the_world_size_is_reported(tmp_path):
    fake_checkpoint(tmp_path / "a", 2, config(tmp_path), world_size=2)  # 8 x 2 accumulation x 2 processes
    text = plan_resume(tmp_path / "a", config(tmp_path), PLACE, "latest").describe()
    print(text)
    assert "global batch 32 -> 16 sequences" in text
    fixed = config(tmp_path, "train.global_batch_size=32")  # accumulation derived per world size: kept
    fake_checkpoint(tmp_path / "b", 2, fixed, world_size=2)
    assert "global batch" not in plan_resume(tmp_path / "b", fixed, PLACE, "latest").describe()


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"),
                                                       (2, "bf16")])
def test_non_finite_losses_are_skipped_counted_and_stop_the_run_with_the_last_good_checkpoint(shard_dir, tmp_path,
                                                                                             zero_stage, precision):
    """A real divergence: lr 1e10 without clipping. Adam's first update moves every weight by exactly +-lr
    (m/sqrt(v) = +-1 at step 1), so step 2's attention logits overflow fp32 and its loss is NaN, on any
    machine; the skipped steps leave the weights as they are, so every later loss is NaN too. At every ZeRO
    stage (ZeRO calls the inner optimizer once per parameter group: the skip must cover all of them), and in
    bf16, where DeepSpeed's own optimizer wrapper holds the fp32 master weights."""
    log = tmp_path / "train.log"
    cmd = command(overrides(shard_dir, tmp_path, f"deepspeed.zero_stage={zero_stage}", f"precision={precision}",
                            "train.lr=1e10",
                            "train.grad_clip=0", "train.warmup_steps=0",
                            "train.schedule=constant", "train.max_bad_steps=3", "checkpoint.every=1",
                            "checkpoint.keep_last=2", "train.max_steps=8"), nproc=1, launcher="python")
    assert run(cmd, log) == 3, tail(log)
    text = log.read_text()
    assert ("error: 3 steps in a row (up to step 4) had a non-finite loss or gradient and were skipped "
            "(train.max_bad_steps=3); stopping.") in text
    assert "Latest checkpoint: step 1." in text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]  # not the checkpoint timing lines
    print([(r["step"], r["loss"], r["skipped_steps"]) for r in records])
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1), (3, 2)]
    assert math.isfinite(records[0]["loss"]) and records[1]["loss"] is None and records[2]["loss"] is None

    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]
    good = checkpoint_weights(checkpoints / "step_00000001")
    assert all(torch.isfinite(t).all() for _, t in good.items())


def test_reshard_of_a_missing_folder_is_refused_naming_the_checkpoints_there_and_step_n_finds_step_0000000n(
        tmp_path, capsys):
    from dist_train.checkpoint.reshard import main as reshard_main

    (tmp_path / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000005" / CLIENT_STATE).write_text("{}")  # a checkpoint, of stage 0
    assert reshard_main(["--checkpoint", str(tmp_path / "checkpoints" / "step_7")]) == 2
    err = capsys.readouterr().err
    assert "step_7 does not exist" in err and "step_00000005" in err
    assert reshard_main(["--checkpoint", str(tmp_path / "checkpoints" / "step_5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_00000005")

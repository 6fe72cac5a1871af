"""What a user hits in the first hour after `make demo`: a re-run of a finished run, a max_steps below the
checkpoint, a config that breaks it, a --resume folder that is not there, data from two tokenizers, a tokenizer
file for its folder, a YAML typo. Each is refused (exit 2, one message with the fix, no traceback) or a no-op
before any process group starts, and leaves the run folder byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import REPO, launch_training
from resume_helpers import STEPS, TINY, overrides, shared_run

from data_prep.errors import run_command
from data_prep.shard import main as shard_main
from launch.train import main as train_main

ZERO2 = "deepspeed.zero_stage=2"


def folder_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file below `root`, and every folder (as None): any write, add or delete shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def finished_run(tmp_path_factory, shard_dir, tmp_path) -> Path:
    """A copy of a finished 6-step 2-process ZeRO-2 run (the one the averaging tests share)."""
    run = tmp_path / "run"
    shutil.copytree(shared_run(tmp_path_factory, shard_dir, "zero2_x2", 2, ZERO2), run)
    return run


@pytest.mark.slow
def test_rerunning_a_finished_run_is_a_no_op_that_changes_no_byte(finished_run, shard_dir):
    before = folder_bytes(finished_run)
    assert json.loads((finished_run / "summary.json").read_text())["final_step"] == STEPS
    proc = launch_training(TINY, overrides(shard_dir, finished_run, ZERO2), nproc=1, launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{finished_run} is finished: step {STEPS} of train.max_steps={STEPS}" in proc.stdout
    assert folder_bytes(finished_run) == before  # no val_loss line, no new summary, config or ranks line


@pytest.mark.slow
def test_max_steps_below_the_checkpoint_is_refused_on_every_rank_with_exit_2_and_no_byte_changed(finished_run,
                                                                                                  shard_dir):
    before = folder_bytes(finished_run)
    proc = launch_training(TINY, overrides(shard_dir, finished_run, ZERO2, "train.max_steps=3"), nproc=2,
                           launcher="deepspeed")
    assert proc.returncode == 2
    assert (f"config error: train.max_steps=3 is below step {STEPS} of {finished_run}/checkpoints/step_00000006: "
            f"this run is past it, and nothing was changed. To train a new 3-step run, give it its own folder "
            f"(run.out_dir={finished_run}-2)") in proc.stderr
    assert "Traceback" not in proc.stderr and "init_process_group" not in proc.stderr
    assert folder_bytes(finished_run) == before


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    code = train_main(["--config", str(TINY), *argv])
    return code, capsys.readouterr().err


def test_a_shape_change_names_a_new_folder_not_resume_none(finished_run, shard_dir, capsys):
    before = folder_bytes(finished_run)
    code, err = run_train([*overrides(shard_dir, finished_run, ZERO2), "model.n_layers=3"], capsys)
    assert code == 2
    assert "cannot be resumed with this config: model.n_layers: 2 -> 3" in err
    assert f"start a new run in its own folder (run.out_dir={finished_run}-2)" in err and "--resume none" not in err
    code, err = run_train([*overrides(shard_dir, finished_run, ZERO2), f"run.out_dir={finished_run}-2",
                           "model.n_layers=3", "--resume", "none", "train.max_steps=1"], capsys)
    assert "cannot be resumed" not in err and "already holds checkpoints" not in err  # the suggested fix is taken
    assert folder_bytes(finished_run) == before


def test_turning_a_dense_checkpoint_into_a_mixture_of_experts_is_refused_as_a_shape_change(finished_run, shard_dir,
                                                                                            capsys):
    before = folder_bytes(finished_run)
    code, err = run_train([*overrides(shard_dir, finished_run, ZERO2), "model.moe.num_experts=4"], capsys)
    assert code == 2
    assert "cannot be resumed with this config: model.moe.num_experts: 0 -> 4" in err
    assert folder_bytes(finished_run) == before


def test_resume_from_a_folder_that_does_not_exist_is_refused_listing_the_checkpoints(finished_run, shard_dir,
                                                                                      capsys):
    before = folder_bytes(finished_run)
    missing = finished_run / "checkpoints" / "step_00000099"
    code, err = run_train(["--resume", str(missing), *overrides(shard_dir, finished_run, ZERO2)], capsys)
    assert code == 2
    assert f"--resume {missing}: {missing} does not exist; pass a checkpoint folder (checkpoints of" in err
    assert "step_00000006" in err
    code, err = run_train(["--resume", "none", *overrides(shard_dir, finished_run, ZERO2)], capsys)
    assert code == 2 and "already holds checkpoints" in err and f"run.out_dir={finished_run}-2" in err
    assert folder_bytes(finished_run) == before


def another_dataset(shard_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shard folder whose manifest lists one train shard fewer: another dataset."""
    other = tmp_path / "other_shards"
    shutil.copytree(shard_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    train["num_tokens"] -= train["shards"].pop()["num_tokens"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


@pytest.mark.slow
def test_a_changed_seed_seq_len_or_dataset_is_refused_before_any_process_group_with_config_yaml_unchanged(
        finished_run, shard_dir, tmp_path):
    """Refused late they crashed rank 0 in the data loader (exit 1, a traceback suggesting
    load_state_dict(strict=False)) after config.yaml had been rewritten with the new values."""
    other = another_dataset(shard_dir, tmp_path)
    before = folder_bytes(finished_run)
    config_yaml = (finished_run / "config.yaml").read_bytes()
    checkpoint = finished_run / "checkpoints" / "step_00000006"
    for change, named in (("train.seed=7", "train.seed: 1234 -> 7"), ("model.seq_len=64", "model.seq_len: 128 -> 64"),
                          (f"data.path={other}", f"data.path: {str(shard_dir)!r} -> {str(other)!r} (another "
                                                 f"dataset: its manifest lists other shards)")):
        proc = launch_training(TINY, overrides(shard_dir, finished_run, ZERO2, "train.max_steps=8", change),
                               nproc=1, launcher="python")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert (f"config error: {checkpoint} cannot be resumed with this config: {named}. Restore these settings, "
                f"or start a new run in its own folder (run.out_dir={finished_run}-2)") in proc.stderr
        assert "Traceback" not in proc.stderr and "init_process_group" not in proc.stderr + proc.stdout
        assert (finished_run / "config.yaml").read_bytes() == config_yaml
        assert folder_bytes(finished_run) == before


def test_a_moved_copy_of_the_data_resumes_and_data_that_cannot_be_compared_is_refused(finished_run, shard_dir,
                                                                                        tmp_path):
    from dist_train.checkpoint.resume import check_before_launch
    from dist_train.config import ConfigError, load_config

    moved = tmp_path / "moved_shards"
    shutil.copytree(shard_dir, moved)

    def config(data_path: Path):
        return load_config(TINY, overrides(data_path, finished_run, ZERO2, "train.max_steps=8"))

    assert check_before_launch(finished_run, config(moved), "latest", 2) is None  # the same shards elsewhere
    meta_file = finished_run / "checkpoints" / "step_00000006" / "client_state.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["data"]["path"] = str(tmp_path / "gone")  # trained on a folder that was deleted since
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'gone'} no longer holds a shard folder, so nothing shows "
                                          f"that {moved} holds the same data; if it is a moved copy, keep the old "
                                          f"path with a symlink there to the copy"):
        check_before_launch(finished_run, config(moved), "latest", 2)
    (tmp_path / "gone").symlink_to(moved)
    assert check_before_launch(finished_run, config(tmp_path / "gone"), "latest", 2) is None


def shard_copy(shard_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_shard_with_token_ids_outside_the_vocabulary_is_refused_before_launch_naming_it(shard_dir, tmp_path,
                                                                                          capsys):
    """Trained on, the first such id crashed the run mid-way (IndexError on the CPU, a device-side assert on a
    GPU). The manifest records each shard's largest id; three small reads per shard check it."""
    data, manifest = shard_copy(shard_dir, tmp_path)
    shard = data / manifest["splits"]["train"]["shards"][2]["path"]
    ids = np.random.default_rng(0).integers(0, 50257, shard.stat().st_size // 2)  # another tokenizer's ids
    ids.astype(np.uint16).tofile(shard)  # same size: the manifest still matches it
    run = tmp_path / "run"
    code, err = run_train(overrides(data, run), capsys)
    assert code == 2
    assert re.search(rf"config error: data.path: shard {shard} holds token id \d+, outside the vocabulary of 2048 "
                     rf"ids \(vocab_size in {data / 'manifest.json'}\): it was made by another tokenizer", err), err
    assert "Traceback" not in err and not run.exists()


def test_a_shard_of_an_old_manifest_is_scanned_for_its_largest_id(shard_dir, tmp_path, capsys):
    from dist_train.config import load_config
    from dist_train.train.preflight import check_data

    data, manifest = shard_copy(shard_dir, tmp_path)
    for entry in manifest["splits"]["train"]["shards"]:
        del entry["max_token_id"]  # written before the field existed
    write_manifest(data, manifest)
    shard = data / manifest["splits"]["train"]["shards"][1]["path"]
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[123_457] = 2048  # one id, far from the start, middle and end
    tokens.flush()
    code, err = run_train(overrides(data, tmp_path / "run"), capsys)
    assert code == 2 and f"shard {shard} holds token id 2048, outside the vocabulary of 2048 ids" in err
    tokens[123_457] = 7
    tokens.flush()
    check_data(load_config(TINY, overrides(data, tmp_path / "run")))  # passes: the scan found the largest id


def test_a_wrong_manifest_dtype_is_refused_by_the_shard_sizes_or_the_token_ids(shard_dir, tmp_path, capsys):
    data, manifest = shard_copy(shard_dir, tmp_path)
    first = data / manifest["splits"]["train"]["shards"][0]["path"]
    write_manifest(data, {**manifest, "dtype": "uint32"})  # uint16 data read as uint32
    code, err = run_train(overrides(data, tmp_path / "run"), capsys)
    assert code == 2 and f"shard {first} is truncated: 1000000 bytes, the manifest says 2000000" in err
    wide = tmp_path / "wide"  # uint32 data read as uint16
    shutil.copytree(data, wide)
    for entry in manifest["splits"]["train"]["shards"]:
        np.fromfile(data / entry["path"], dtype=np.uint16).astype(np.uint32).tofile(wide / entry["path"])
    write_manifest(wide, manifest)
    code, err = run_train(overrides(wide, tmp_path / "run"), capsys)
    assert code == 2 and f"shard {wide / first.name} is too long: 2000000 bytes, the manifest says 1000000" in err
    for entry in manifest["splits"]["train"]["shards"]:  # a hand-made manifest counting uint32 tokens in uint16 data
        path = data / entry["path"]
        entry["num_tokens"] //= 2
        os.truncate(path, 4 * entry["num_tokens"])
        del entry["max_token_id"]
    manifest["splits"]["train"]["num_tokens"] = sum(e["num_tokens"] for e in manifest["splits"]["train"]["shards"])
    write_manifest(data, {**manifest, "dtype": "uint32"})
    code, err = run_train(overrides(data, tmp_path / "run"), capsys)
    assert code == 2 and re.search(rf"shard {first} holds token id \d{{6,}}, outside the vocabulary of 2048", err)
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_sources_made_by_different_tokenizers_are_refused_before_anything_is_written(shard_dir, tmp_path, capsys):
    other = tmp_path / "other_shards"
    shutil.copytree(shard_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"], manifest["prep"]["tokenizer_sha256"] = "/elsewhere/gpt2_tok", "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    code, err = run_train([f"run.out_dir={run}", "data.path=null",
                           f"data.sources=[{{path: {shard_dir}}}, {{path: {other}}}]"], capsys)
    assert code == 2
    assert f"data.sources: {other} was made by another tokenizer than {shard_dir} (/elsewhere/gpt2_tok" in err
    first_tokenizer = json.loads((shard_dir / "manifest.json").read_text())["tokenizer"]
    assert f"Re-shard {other} with `python -m data_prep.shard --tokenizer {first_tokenizer} ...`" in err
    assert not run.exists()


def test_a_tokenizer_file_is_refused_naming_its_folder(tokenizer_dir, corpus_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_command(shard_main, ["--input", str(corpus_file), "--tokenizer", str(tokenizer_dir / "tokenizer.json"),
                                 "--out", str(tmp_path / "shards")])
    assert e.value.code == 2
    assert f"pass the folder {tokenizer_dir}" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_run_local_help_prints_the_usage_and_a_missing_count_is_named():
    proc = subprocess.run(["bash", str(REPO / "launch" / "run_local.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "bash launch/run_local.sh N --config configs/tiny.yaml" in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "launch" / "run_local.sh"), "--config", "configs/tiny.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "the first argument is the number of processes, got '--config'" in proc.stderr


def test_yaml_errors_name_the_file_and_line_in_every_command(tmp_path, capsys):
    from dist_train.scaling.cli import main as scaling_main
    from launch.slurm import main as slurm_main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 4\n\tseq_len: 64\n")
    for command, argv in ((scaling_main, ["count", "--config", str(bad)]),
                          (slurm_main, ["submit", "--config", str(bad), "--nodes", "1", "--gpus-per-node", "1"]),
                          (train_main, ["--config", str(bad)])):
        assert command(argv) == 2
        err = capsys.readouterr().err
        assert f"config file {bad}, line 3, column 1 is not valid YAML: " in err and "<unicode string>" not in err
    assert scaling_main(["count", "--config", str(TINY), "wandb.tags=[a"]) == 2
    assert "override wandb.tags=[a: the value is not valid YAML" in capsys.readouterr().err


def test_slurm_submit_runs_the_trainers_preflight_before_submitting(tmp_path, shard_dir, capsys):
    from launch.slurm import main as slurm_main

    job = ["submit", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
           f"run.out_dir={tmp_path / 'run'}"]
    assert slurm_main([*job, f"data.path={tmp_path / 'nope'}"]) == 2
    assert f"data.path: {tmp_path / 'nope'} does not exist; make it with" in capsys.readouterr().err
    assert slurm_main([*job, f"data.path={shard_dir}", "model.vocab_size=1000"]) == 2
    assert "model.vocab_size (1000) is smaller than the tokenizer's vocabulary (2048" in capsys.readouterr().err
    assert slurm_main([*job, "--set", f"data.path={shard_dir}", "--gpu-memory", "0.001"]) == 2
    assert "GiB per GPU (python -m dist_train.scaling memory" in capsys.readouterr().err
    assert slurm_main([*job, "--set", f"data.path={shard_dir}"]) == 0  # --set works as a positional k=v
    out = capsys.readouterr()
    assert out.out.startswith("#!/bin/bash") and "estimated peak" in out.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_local_trains_while_another_run_holds_the_port_it_used_to_take(shard_dir, tmp_path):
    """Two runs on one machine (a demo next to an experiment): run_local.sh used the fixed port 29517, and the
    second run died with EADDRINUSE. Now it takes a free port unless MASTER_PORT names one."""
    import contextlib
    import socket

    from distributed_helpers import cpu_env

    with socket.socket() as held:
        with contextlib.suppress(OSError):  # something else already holds it: the run must still start
            held.bind(("127.0.0.1", 29517))
        held.listen()
        env = {k: v for k, v in cpu_env().items() if k != "MASTER_PORT"}
        proc = subprocess.run(["bash", str(REPO / "launch" / "run_local.sh"), "2", "--config", str(TINY),
                               *overrides(shard_dir, tmp_path, "train.max_steps=1", "checkpoint.every=0")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "address already in use" not in (proc.stdout + proc.stderr).lower()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1

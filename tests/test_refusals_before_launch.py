"""What a user hits in the first hour after `make demo`: a re-run of a finished run, a max_steps below the
checkpoint, a config that breaks it, a --resume folder that is not there, data from two tokenizers, a tokenizer
file for its folder, a YAML typo. Each is refused (exit 2, one message with the fix, no traceback) or a no-op
before any process group starts, and leaves the run folder byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

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

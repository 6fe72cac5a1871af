"""`python -m launch.slurm` without a cluster: the batch script it would submit, and the refusals of bad input.

These run the real command line in a subprocess; the script is checked by bash itself (`bash -n`).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from slurm_helpers import REPO, TINY, slurm_cli

from launch.sbatch import time_limit_s


def sbatch_directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH ")]


def shell_array(script: str, name: str) -> list[str]:
    """The words of a `NAME=(...)` line, as bash itself splits them."""
    line = next(line for line in script.splitlines() if line.startswith(f"{name}=("))
    out = subprocess.run(["bash", "-c", f'{line}; printf "%s\\n" "${{{name}[@]}}"'], capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()


def test_dry_run_for_4_nodes_x_8_gpus_is_a_valid_sbatch_script_with_the_expected_directives(tmp_path, shard_dir):
    run_dir = tmp_path / "big_run"
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "4", "--gpus-per-node", "8",
                     "--partition", "gpu", "--account", "proj42", "--time", "2-00:00:00", "--cpus-per-task", "12",
                     "--dry-run", f"run.out_dir={run_dir}", "train.max_steps=1000", "--set", f"data.path={shard_dir}")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash\n")
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr

    assert sbatch_directives(script) == [
        "--job-name=dist_train-big_run", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--cpus-per-task=12", "--partition=gpu", "--account=proj42", "--time=2-00:00:00", f"--chdir={REPO}",
        f"--output={run_dir}/slurm/%j.out", "--open-mode=append", "--requeue", "--signal=B:USR1@300",
    ]
    assert shell_array(script, "DT_SRUN_ARGS") == [
        "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=0", "--wait=120", "--gpus-per-node=8",
        "--cpus-per-task=12"]
    assert shell_array(script, "DT_TRAIN") == [
        str(REPO / "launch" / "train.py"), "--config", str(TINY), f"run.out_dir={run_dir}", "train.max_steps=1000",
        f"data.path={shard_dir}"]
    assert "DT_LAUNCHER=srun" in script
    assert "DS_ACCELERATOR" not in script, "a GPU job must not pin DeepSpeed to the CPU"
    assert not run_dir.exists(), "--dry-run must write nothing"


def test_deepspeed_launcher_asks_for_one_task_per_node_holding_all_its_cpus(tmp_path, shard_dir):
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task",
                     "4", "--launcher", "deepspeed", "--dry-run", "--json", f"run.out_dir={tmp_path}",
                     f"data.path={shard_dir}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["script_path"] == str(tmp_path / "slurm" / "job.sbatch")
    directives = sbatch_directives(result["script"])
    assert "--ntasks-per-node=1" in directives
    assert "--gpus-per-node=8" in directives
    assert "--cpus-per-task=32" in directives
    assert "DT_LAUNCHER=deepspeed" in result["script"]
    assert "DT_PROCS_PER_NODE=8" in result["script"]


def test_cpu_job_asks_for_no_gpus_and_runs_deepspeed_on_the_cpu(tmp_path, shard_dir):
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "1", "--cpu",
                     "--dry-run", f"run.out_dir={tmp_path}", f"data.path={shard_dir}")
    assert proc.returncode == 0, proc.stderr
    assert not any(d.startswith("--gpus") for d in sbatch_directives(proc.stdout))
    assert "--gpus-per-node=1" not in shell_array(proc.stdout, "DT_SRUN_ARGS")
    assert "export DS_ACCELERATOR=cpu" in proc.stdout.splitlines()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--nodes", "0", "--nodes must be at least 1, got 0"),
    ("--gpus-per-node", "0", "--gpus-per-node must be at least 1, got 0"),
    ("--cpus-per-task", "-2", "--cpus-per-task must be at least 1, got -2"),
])
def test_counts_below_one_are_refused_by_name(tmp_path, option, value, message):
    args = {"--nodes": "2", "--gpus-per-node": "8", option: value}
    flat = [word for pair in args.items() for word in pair]
    proc = slurm_cli("submit", "--config", str(TINY), *flat, f"run.out_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"error: {message}" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_config_file_is_refused_before_anything_is_written(tmp_path):
    proc = slurm_cli("submit", "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "1")
    assert proc.returncode == 2
    assert f"error: config file {tmp_path / 'nope.yaml'} does not exist" in proc.stderr


def test_bad_config_override_is_refused_naming_the_key(tmp_path):
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1",
                     f"run.out_dir={tmp_path / 'run'}", "train.max_stepz=10")
    assert proc.returncode == 2
    assert "max_stepz" in proc.stderr and "max_steps" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_submit_without_sbatch_installed_says_so_and_writes_nothing(tmp_path, shard_dir):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin)}
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "8",
                     f"run.out_dir={tmp_path / 'run'}", f"data.path={shard_dir}", env=env)
    assert proc.returncode == 1
    assert "error: `sbatch` is not installed or not on PATH" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_subcommand_has_help():
    for command in ("submit", "run", "status", "cancel"):
        proc = slurm_cli(command, "--help")
        assert proc.returncode == 0 and "usage: python -m launch.slurm" in proc.stdout, command


def refused_in_one_line(proc: subprocess.CompletedProcess, start: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.stderr.startswith(f"error: {start}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", "no batch script was printed"


@pytest.mark.parametrize(("flag", "value"), [
    # A newline would end #SBATCH parsing here, dropping --requeue and --signal, and run the rest as shell.
    ("--partition", "gpu\n#SBATCH --output=/tmp/elsewhere"),
    ("--partition", "gpu debug"),
    ("--account", "proj42\nrm -rf ~"),
    ("--account", "proj42#x"),
    ("--time", "24:00:00\necho injected"),
    ("--time", "1 day"),
    ("--time", "12h"),
    ("--time", "1:2:3:4"),
])
def test_a_value_slurm_does_not_read_as_itself_is_refused_naming_its_flag(tmp_path, shard_dir, flag, value):
    run_dir = tmp_path / "run"
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1", flag, value,
                     "--dry-run", f"run.out_dir={run_dir}", f"data.path={shard_dir}")
    refused_in_one_line(proc, f"{flag} {value!r}")
    assert not run_dir.exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--time", "5", "--grace", "300"], "--time 5 (300 s) is not longer than --grace 300"),
    (["--grace", "70000"], "--grace must be 0 to 65535 seconds"),
])
def test_a_time_limit_within_the_grace_or_a_grace_slurm_cannot_signal_is_refused(tmp_path, shard_dir, options,
                                                                                 message):
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1", *options,
                     "--dry-run", f"run.out_dir={tmp_path / 'run'}", f"data.path={shard_dir}")
    refused_in_one_line(proc, message)


@pytest.mark.parametrize("folder", ["a#b", "two words", "100%"])
def test_a_run_folder_a_sbatch_line_cannot_carry_is_refused(tmp_path, shard_dir, folder):
    run_dir = tmp_path / folder
    proc = slurm_cli("submit", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1", "--dry-run",
                     f"run.out_dir={run_dir}", f"data.path={shard_dir}")
    refused_in_one_line(proc, f"run.out_dir {str(run_dir)!r} contains")
    assert not run_dir.exists()


def test_prep_refuses_a_partition_with_a_newline_before_writing_its_scripts(tmp_path):
    out = tmp_path / "shards"
    proc = slurm_cli("prep", "--tasks", "2", "--input", str(tmp_path), "--tokenizer", str(tmp_path), "--out",
                     str(out), "--partition", "cpu\necho injected", "--dry-run")
    refused_in_one_line(proc, "--partition 'cpu\\necho injected'")
    assert not out.exists()


def test_cancel_refuses_an_option_given_as_the_job_id_before_calling_scancel(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    # `scancel --batch --signal=USR2 --user=root` would signal every job of that user.
    proc = slurm_cli("cancel", "--", "--user=root", env={**os.environ, "PATH": str(empty_bin)})
    refused_in_one_line(proc, "JOBID '--user=root' is not a SLURM job id")


@pytest.mark.parametrize(("value", "seconds"), [
    ("90", 5400), ("1:30", 90), ("24:00:00", 86400), ("2-12", 216000), ("1-00:30", 88200),
    ("1-00:00:10", 86410), ("0", None), ("UNLIMITED", None), ("infinite", None), (None, None),
])
def test_every_time_limit_form_slurm_documents_is_accepted_and_read_in_seconds(value, seconds):
    assert time_limit_s(value) == seconds

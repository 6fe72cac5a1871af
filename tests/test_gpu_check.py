"""bench/gpu_check.sh, the one command a lent GPU runs: its --dry-run lists every check's command on any machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import REPO

from dist_train.config import load_config

CHECKS = ["env", "nccl-1", "nccl-N", "fp16-zero0", "fp16-zero2", "kernels", "compile-zero2", "zero3-offload",
          "memory-estimate", "reshard-resume", "mfu-eager", "mfu-compiled", "trainer-vs-hf", "moe", "document-mask",
          "attention-mask"]
PYTEST_SELECTIONS = {
    "memory-estimate": ["tests/test_scaling.py::test_memory_estimate_matches_torch_cuda_max_memory_allocated"],
    "document-mask": ["tests/test_document_mask.py::test_cuda_flex_kernel_gives_the_dense_masks_logits_and_gradients"
                      f"[{dtype}]" for dtype in ("fp32", "bf16")],
}
"""The tests each pytest check must select: an empty selection would pass on a GPU without checking anything."""


def test_gpu_check_dry_run_prints_every_command_it_would_run(tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == CHECKS
    commands = dict(line.split(": ", 1) for line in lines)
    assert all(f"--results {results}" in c for c in commands.values())
    assert "precision=fp16 deepspeed.zero_stage=0" in commands["fp16-zero0"]
    assert "precision=fp16 deepspeed.zero_stage=2" in commands["fp16-zero2"]
    assert "same-losses fp16-zero0-vs-2 fp16-zero0 fp16-zero2" in commands["fp16-zero2"]
    assert "deepspeed.offload_optimizer=true deepspeed.offload_params=true" in commands["zero3-offload"]
    assert "deepspeed.zero_stage=3" in commands["zero3-offload"]
    assert "train.compile=true" in commands["compile-zero2"] and "train.compile=true" in commands["mfu-compiled"]
    for name in ("mfu-eager", "mfu-compiled"):
        assert "bench/mfu.py --config configs/llama-1b.yaml" in commands[name]
    assert "bench/throughput.py" in commands["trainer-vs-hf"] and "hf-trainer" in commands["trainer-vs-hf"]
    assert "-k cuda_max_memory" in commands["memory-estimate"]
    assert "bench/moe.py" in commands["moe"] and "--json" in commands["moe"]
    assert "model.attention=flex" in commands["document-mask"] and "model.attention=sdpa" in commands["document-mask"]
    assert "same-losses doc-mask-flex-vs-dense" in commands["document-mask"]
    assert "--device cuda" in commands["attention-mask"] and "--seq 512 2048 8192" in commands["attention-mask"]
    assert not results.exists(), "a dry run must not run or record anything"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_gpu_check_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "r.jsonl")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no GPU" in proc.stderr


def test_gpu_check_results_are_one_json_line_per_check(tmp_path):
    results = tmp_path / "results.jsonl"
    helper = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--results", str(results)]
    lines = [{"check": "a", "ok": True, "losses": [5.0, 4.0]}, {"check": "b", "ok": True, "losses": [5.0, 4.02]}]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    for args, stdin in [(["same-losses", "a-vs-b", "a", "b", "--rel", "0.01"], None),
                        (["same-losses", "a-vs-b-strict", "a", "b", "--rel", "0.001"], None),
                        # DeepSpeed logs to stdout when imported: a script's JSON can follow such lines
                        (["record", "mfu", ], '[INFO] Setting ds_accelerator to cuda\n{"tokens_per_s": 1000.0,\n'
                                              ' "mfu": 0.5}\n'),
                        (["record", "no-json"], "[INFO] Setting ds_accelerator to cuda\n"),
                        (["status", "timed-out", "124"], None)]:
        proc = subprocess.run(helper + args, input=stdin, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    got = {r["check"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert got["a-vs-b"]["ok"] and got["a-vs-b"]["max_rel_diff"] == pytest.approx(0.005)
    assert not got["a-vs-b-strict"]["ok"]
    assert got["mfu"] == {"check": "mfu", "tokens_per_s": 1000.0, "mfu": 0.5, "ok": True}
    assert got["timed-out"] == {"check": "timed-out", "exit": 124, "ok": False}
    assert not got["no-json"]["ok"] and "Setting ds_accelerator" in got["no-json"]["output_tail"]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="on a GPU machine the CUDA test runs")
def test_a_gpu_test_that_skips_is_not_counted_as_a_passed_check(tmp_path):
    results = tmp_path / "results.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--results", str(results), "pytest",
                           "memory-estimate", "tests/test_scaling.py", "-m", "gpu", "-k", "cuda_max_memory"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(results.read_text())
    assert record["exit"] == 0 and not record["ok"] and "1 skipped" in record["output_tail"]


def dry_run_commands(results: Path, gpus: int) -> dict[str, str]:
    """Each check's name and the bash command it runs (the argument of `bash -c`), from `--dry-run`."""
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(results)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "NGPU": str(gpus)})
    assert proc.returncode == 0, proc.stderr
    commands = {}
    for line in proc.stdout.splitlines():
        name, quoted = line.split(": ", 1)
        words = shlex.split(quoted)
        assert words[0] == "timeout" and words[2:4] == ["bash", "-c"] and len(words) == 5, line
        commands[name] = words[4]
    return commands


def pipeline_stages(command: str) -> list[list[str]]:
    """`a x && b y | c z` -> [[a, x], [b, y], [c, z]]: the programs a bash command line runs."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    stages: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "|"):
            stages.append([])
        else:
            stages[-1].append(token)
    return stages


def bench_script(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_gpu_check_command_is_accepted_by_its_script_and_its_config(tmp_path, monkeypatch):
    """A lent GPU has minutes: a check whose own script refuses its arguments, whose overrides its config
    refuses, or whose pytest selection is empty must fail here, on the CPU. (The `train` checks once put their
    overrides after `--nproc`, which argparse refused: every training check would have failed on the GPU.)"""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the scripts import each other as bench/ does
    commands = dry_run_commands(tmp_path / "results.jsonl", gpus=4)
    stages = [stage for command in commands.values() for stage in pipeline_stages(command)]
    assert all(stage[0] == "python3" for stage in stages), stages
    checked = set()
    for stage in stages:
        if stage[1] == "-c":  # the env check's one-liner
            compile(stage[2], "<env check>", "exec")
            continue
        script, argv = stage[1], stage[2:]
        if script == "bench/gpu_check.py":
            args = bench_script(script).parse_args(argv)
            checked.add(f"{script} {args.command}")
            if args.command == "train":
                assert args.nproc in (1, 4)
                load_config(args.config, args.overrides)
            elif args.command == "pytest":
                proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                                       "no:cacheprovider", *args.pytest_args], cwd=REPO, capture_output=True,
                                      text=True, timeout=120)
                selected = [line for line in proc.stdout.splitlines() if "::" in line]
                assert selected == PYTEST_SELECTIONS[args.name], proc.stdout
        else:
            args = bench_script(script).build_parser().parse_args(argv)
            checked.add(script)
            if hasattr(args, "config"):  # bench/attention_mask.py builds its model from its own options
                load_config(args.config, args.overrides)
    assert checked == {"bench/gpu_check.py train", "bench/gpu_check.py same-losses", "bench/gpu_check.py kernels",
                       "bench/gpu_check.py pytest", "bench/gpu_check.py record",
                       "bench/gpu_check.py cpu-to-gpu-resume", "bench/mfu.py",
                       "bench/throughput.py", "bench/moe.py", "bench/attention_mask.py"}

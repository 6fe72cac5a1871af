"""bench/gpu_check.sh, the one command a lent GPU runs: its --dry-run lists every check's command on any machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from distributed_helpers import REPO

CHECKS = ["env", "nccl-1", "nccl-N", "fp16-zero0", "fp16-zero2", "kernels", "compile-zero2", "zero3-offload",
          "memory-estimate", "mfu-eager", "mfu-compiled", "trainer-vs-hf"]


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
    assert "deepspeed.offload_optimizer=true deepspeed.offload_params=true" in commands["zero3-offload"]
    assert "deepspeed.zero_stage=3" in commands["zero3-offload"]
    assert "train.compile=true" in commands["compile-zero2"] and "train.compile=true" in commands["mfu-compiled"]
    for name in ("mfu-eager", "mfu-compiled"):
        assert "bench/mfu.py --config configs/llama-1b.yaml" in commands[name]
    assert "bench/throughput.py" in commands["trainer-vs-hf"] and "hf-trainer" in commands["trainer-vs-hf"]
    assert "-k cuda_max_memory" in commands["memory-estimate"]
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
                        (["record", "mfu", ], '{"tokens_per_s": 1000.0,\n "mfu": 0.5}'),
                        (["status", "timed-out", "124"], None)]:
        proc = subprocess.run(helper + args, input=stdin, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    got = {r["check"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert got["a-vs-b"]["ok"] and got["a-vs-b"]["max_rel_diff"] == pytest.approx(0.005)
    assert not got["a-vs-b-strict"]["ok"]
    assert got["mfu"] == {"check": "mfu", "tokens_per_s": 1000.0, "mfu": 0.5, "ok": True}
    assert got["timed-out"] == {"check": "timed-out", "exit": 124, "ok": False}

"""The metrics logger: who gets which backends, training without wandb, per-rank throughput."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_distributed

from dist_train.checkpoint.layout import TrainState
from dist_train.config import load_config
from dist_train.distributed.environment import ProcessPlace
from dist_train.monitor.jsonl import JsonlBackend, read_metrics
from dist_train.monitor.metrics import build_logger
from dist_train.monitor.throughput import ForwardTimer, gather_rank_throughput


def place(rank: int) -> ProcessPlace:
    return ProcessPlace(rank=rank, local_rank=rank, world_size=2, host="h", slurm_node=None,
                        slurm_job_id=None, slurm_restart_count=0)


def config(run_dir: Path, *overrides: str):
    run_dir.mkdir(parents=True, exist_ok=True)
    return load_config(None, [f"run.out_dir={run_dir}", f"data.path={run_dir}", *overrides])


class Untouchable(types.ModuleType):
    """Stands in for `wandb` in sys.modules: any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"wandb.{name} was used")


def test_only_rank0_gets_backends_and_other_ranks_never_touch_wandb(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", Untouchable("wandb"))
    cfg = config(tmp_path / "run", "wandb.enabled=true")
    state = TrainState()
    logger = build_logger(cfg, tmp_path / "run", place(1), state, resumed=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert logger.backends == []
    assert state.wandb_run_id is None
    assert list((tmp_path / "run").iterdir()) == []  # rank 1 writes nothing in the run folder


@pytest.mark.parametrize("how", ["package missing", "mode disabled", "not enabled"])
def test_training_logs_unchanged_without_wandb(tmp_path, monkeypatch, capsys, how) -> None:
    if how == "package missing":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
        cfg = config(tmp_path / "run", "wandb.enabled=true")
    else:
        monkeypatch.setitem(sys.modules, "wandb", Untouchable("wandb"))
        cfg = config(tmp_path / "run", *(["wandb.enabled=true", "wandb.mode=disabled"]
                                         if how == "mode disabled" else []))
    logger = build_logger(cfg, tmp_path / "run", place(0), TrainState(), resumed=False)
    logger.log({"step": 1, "loss": 2.0, "mfu": None})
    logger.summary({"final_step": 1})
    logger.close()

    assert [type(b) for b in logger.backends] == [JsonlBackend]
    assert read_metrics(tmp_path / "run") == [{"step": 1, "loss": 2.0, "mfu": None}]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"final_step": 1}
    assert not (tmp_path / "run" / "wandb").exists()
    out = capsys.readouterr().out
    if how == "package missing":
        assert "the wandb package is not installed; logging to metrics.jsonl only" in out
    else:
        assert out == ""


def test_resumed_jsonl_drops_the_steps_the_resumed_run_trains_again(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [{"step": s, "loss": 1.0} for s in range(1, 9)] + [{"step": 4, "val_loss": 2.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
    JsonlBackend(run_dir, resume_step=4).close()
    assert [(r["step"], "val_loss" in r) for r in read_metrics(run_dir)] == [
        (1, False), (2, False), (3, False), (4, False), (4, True)]


class SlowOnRank(torch.nn.Module):
    """A linear layer whose forward sleeps on one rank: a straggler."""

    def __init__(self, slow_rank: int, rank: int):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.delay_s = 0.05 if rank == slow_rank else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.linear(x)


def _throughput_with_a_straggler(rank: int, world_size: int) -> tuple[dict, list[float]]:
    model = SlowOnRank(slow_rank=1, rank=rank)
    timer = ForwardTimer(model, torch.device("cpu"))
    step_seconds = []
    for _ in range(4):  # data-parallel steps: forward, backward, then an all-reduce that waits for everyone
        start = time.perf_counter()
        model(torch.randn(4, 8)).sum().backward()
        grad = model.linear.weight.grad
        torch.distributed.all_reduce(grad)
        step_seconds.append(time.perf_counter() - start)
    model.eval()
    model.delay_s = 1.0 if rank == 0 else 0.0
    with torch.no_grad():
        model(torch.randn(4, 8))  # evaluation forward passes are not training throughput
    model.train()
    return gather_rank_throughput(timer, tokens_per_forward=4 * 16), step_seconds


@pytest.mark.slow
def test_rank_throughput_shows_the_straggler_that_step_times_hide() -> None:
    (record, steps0), (record1, steps1) = run_distributed(_throughput_with_a_straggler, 2)

    assert record == record1  # every rank gets the gathered values
    assert record["slowest_rank"] == 1
    per_rank = [record["fwd_tokens_per_s/rank_0"], record["fwd_tokens_per_s/rank_1"]]
    assert record["fwd_tokens_per_s_min"] == per_rank[1] and record["fwd_tokens_per_s_max"] == per_rank[0]
    assert per_rank[1] == pytest.approx(64 / 0.05, rel=0.3)  # 64 tokens per 50 ms forward
    assert per_rank[0] > 10 * per_rank[1]
    # Why forward time: the all-reduce makes the fast rank wait, so its step time is the straggler's too.
    assert sum(steps0[1:]) == pytest.approx(sum(steps1[1:]), rel=0.3)


@pytest.mark.parametrize(("name", "half", "tf32", "fp32"), [
    ("NVIDIA L4", 121.0, 60.0, 30.3),
    ("NVIDIA L40", 181.05, 90.5, 90.5),  # not the L4's figures: whole words only
    ("NVIDIA L40S", 362.05, 183.0, 91.6),
    ("NVIDIA H100 80GB HBM3", 989.4, 494.7, 66.9),
    ("NVIDIA H100 PCIe", 756.0, 378.0, 51.2),
    ("NVIDIA H100 NVL", 835.0, 417.5, 60.0),
    ("NVIDIA H200", 989.4, 494.7, 66.9),
    ("NVIDIA H200 NVL", 835.0, 417.5, 60.0),  # the NVL card, not the SXM module
    ("NVIDIA GH200 480GB", 989.4, 494.7, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 19.5),
    ("AMD Instinct MI250X/MI250", 191.5, None, 47.9),  # one GCD: torch shows each half of the card
    ("AMD Instinct MI300X", 1307.4, 653.7, 163.4),
    ("Tesla V100-SXM2-32GB", 125.0, None, 15.7),
])
def test_peak_flops_table_matches_the_device_name_by_whole_words(name, half, tf32, fp32):
    from dist_train.monitor.throughput import device_peak

    peak = device_peak(name)
    assert (peak.half, peak.tf32, peak.fp32) == (half, tf32, fp32)


def test_a_device_missing_from_the_peak_table_has_no_peak():
    from dist_train.monitor.throughput import device_peak

    assert device_peak("NVIDIA A10G") is None  # no data sheet; and not the A10's entry
    assert device_peak("NVIDIA L") is None


def test_mfu_uses_the_peak_of_the_math_the_run_uses():
    """bf16/fp16 runs divide by the 16-bit tensor-core peak; fp32 runs by the TF32 peak when torch may use TF32
    for fp32 matmuls, else by the plain fp32 peak."""
    from dist_train.monitor.throughput import math_mode

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert [math_mode(p) for p in ("bf16", "fp16", "fp32")] == ["half", "half", "fp32"]
        torch.set_float32_matmul_precision("high")
        assert [math_mode(p) for p in ("bf16", "fp16", "fp32")] == ["half", "half", "tf32"]
    finally:
        torch.set_float32_matmul_precision(before)


def test_forward_timer_hooks_run_outside_a_compiled_model_and_never_recompile_it() -> None:
    """engine.compile() compiles the module's call, hooks included. Traced, the timer's clock readings became
    dynamo guards: every pass recompiled its hook (up to the limit of 8), and the compiled forward of an 8-layer
    MLP ran 3x slower on this CPU. Run eagerly, they add no recompilation and time the passes."""
    import torch._dynamo

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    timer = ForwardTimer(model, torch.device("cpu"))
    model.compile()
    x = torch.randn(8, 64)
    model(x)  # compiles
    timer.take()
    with torch._dynamo.config.patch(error_on_recompile=True):
        start = time.perf_counter()
        for _ in range(5):
            model(x)
        wall = time.perf_counter() - start
    seconds, passes = timer.take()
    assert passes == 5 and 0 < seconds <= wall
    torch._dynamo.reset()

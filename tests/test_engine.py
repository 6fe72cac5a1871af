"""The generated DeepSpeed engine on a cluster's terms: fp32 gradient accumulation under bf16, overlapped reduction
at ZeRO 1/2, DeepSpeed's CPU Adam when offloading, torch.compile through the engine, a distinct RNG stream per rank,
TF32, and the universal conversion's worker processes. Multi-process parts run real engines on 2 gloo processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO, run_distributed

from dist_train.checkpoint.reshard import MAX_EXTRACT_WORKERS, MAX_MERGE_WORKERS, conversion_workers
from dist_train.config import load_config
from dist_train.distributed.process_group import configure_matmul_precision
from dist_train.engine.ds_config import OVERLAP_BUCKET, deepspeed_config

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 3


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_ds_config_sums_bf16_gradients_in_fp32_and_overlaps_at_zero_1_and_2(stage: int) -> None:
    ds = deepspeed_config(load_config(TINY, [f"deepspeed.zero_stage={stage}", "precision=bf16"]), world_size=2)
    zero = ds["zero_optimization"]
    # DeepSpeed 0.19 refuses bf16 with fp32 accumulation without ZeRO ("unsupported mix"): stage 0 sums in bf16.
    assert ds.get("data_types") == (None if stage == 0 else {"grad_accum_dtype": "fp32"})
    assert ds.get("communication_data_type") == (None if stage == 0 else "fp32")  # the all-reduce too
    assert zero.get("overlap_comm", False) is (stage in (1, 2))
    if stage in (1, 2):
        assert zero["allgather_bucket_size"] == zero["reduce_bucket_size"] <= OVERLAP_BUCKET
    fp32 = deepspeed_config(load_config(TINY, [f"deepspeed.zero_stage={stage}", "precision=fp32"]), world_size=2)
    before = deepspeed_config(load_config(TINY, [f"deepspeed.zero_stage={stage}", "precision=bf16",
                                                 "deepspeed.grad_accum_dtype=bf16"]), world_size=2)
    assert "data_types" not in fp32 and "data_types" not in before
    assert "communication_data_type" not in fp32 and "communication_data_type" not in before


def test_offloaded_optimizer_keeps_deepspeeds_cpu_optimizer_check_on() -> None:
    ds = deepspeed_config(load_config(TINY, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]), 2)
    # DeepSpeed's default (True) refuses an offload with any optimizer but its CPU Adam: ours passes it.
    assert ds.get("zero_force_ds_cpu_optimizer", True) is True


def test_tf32_switch_sets_cudas_fp32_matmul_precision_and_leaves_the_cpu_alone() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        configure_matmul_precision(torch.device("cuda", 0), tf32=True)
        assert torch.get_float32_matmul_precision() == "high"  # TF32 tensor cores for fp32 matmuls
        configure_matmul_precision(torch.device("cuda", 0), tf32=False)
        assert torch.get_float32_matmul_precision() == "highest"
        configure_matmul_precision(torch.device("cpu"), tf32=True)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_universal_conversion_uses_a_worker_per_rank_file_up_to_the_cpus() -> None:
    assert conversion_workers(cpus=64, rank_files=8) == (8, MAX_MERGE_WORKERS)
    assert conversion_workers(cpus=64, rank_files=512) == (MAX_EXTRACT_WORKERS, MAX_MERGE_WORKERS)
    assert conversion_workers(cpus=2, rank_files=8) == (2, 2)
    assert conversion_workers(cpus=1, rank_files=0) == (1, 1)


def test_a_universal_load_leaves_adams_step_where_torchs_own_load_puts_it() -> None:
    """DeepSpeed's universal load assigns the `step` it read to the CPU; a fused AdamW on a GPU reads it on the
    device. After `place_loaded_steps` each step sits where torch's Optimizer.load_state_dict would put it. The
    parameters are on the meta device here: a device other than the CPU, as a GPU's are."""
    from types import SimpleNamespace

    from dist_train.checkpoint.reshard import place_loaded_steps

    params = [torch.nn.Parameter(torch.zeros(3, device="meta")) for _ in range(3)]
    fused = torch.optim.AdamW([{"params": params[:2]}], fused=True)
    plain = torch.optim.AdamW([{"params": params[2:]}])
    for optimizer in (fused, plain):
        for param in optimizer.param_groups[0]["params"]:  # what the universal load leaves
            optimizer.state[param] = {"step": torch.tensor(7.0, dtype=torch.float64), "exp_avg": torch.zeros_like(
                param), "exp_avg_sq": torch.zeros_like(param)}
        by_torch = type(optimizer)([{"params": optimizer.param_groups[0]["params"]}],
                                   **({"fused": True} if optimizer is fused else {}))
        by_torch.load_state_dict(optimizer.state_dict())
        place_loaded_steps(SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer)))
        for param in optimizer.param_groups[0]["params"]:
            ours, theirs = optimizer.state[param]["step"], by_torch.state[param]["step"]
            assert (ours.device, ours.dtype) == (theirs.device, theirs.dtype)
    assert fused.state[params[0]]["step"].device.type == "meta" and plain.state[params[2]]["step"].device.type == "cpu"


def _overrides(shard_dir: str, out_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={shard_dir}", f"run.out_dir={out_dir}", "model.n_layers=2", f"train.max_steps={STEPS}",
            "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.eval_every=0", "checkpoint.every=0",
            "train.warmup_steps=1", "train.log_every=100", "wandb.enabled=false", *extra]


def _train_a_few_steps(cfg, place) -> dict:  # noqa: ANN001
    from dist_train.train.signals import StopRequest
    from dist_train.train.trainer import Run

    run = Run.set_up(cfg, place, torch.device("cpu"), "none")  # run_distributed started the process group
    draw = torch.rand(4).tolist()  # the first draw of this rank's stream (dropout would take it)
    engine = run.engine
    out = {"rng_draw": draw, "compiled": engine.is_compiled, "optimizer": type(engine.optimizer).__name__,
           "data_types": [str(t) for t in engine.get_data_types()],
           "optimizer_classes": [c.__name__ for c in type(engine.basic_optimizer).__mro__],
           "overlap_comm": bool(getattr(engine.optimizer, "overlap_comm", False))}
    out["losses"] = [run.step(StopRequest(), measure_grad_norm=False).loss for _ in range(STEPS)]
    run.logger.close()
    engine.destroy()
    return out


def _engine_cases(rank: int, world_size: int, shard_dir: str, root: str) -> dict:
    from dist_train import distributed
    from dist_train.checkpoint.rng import seed_rank_streams

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/dist_train/torch_extensions"))
    place = distributed.discover()
    results = {}
    cases = {f"zero{s}": [f"deepspeed.zero_stage={s}"] for s in (1, 2, 3)}
    cases.update({f"zero{s}+compile": [f"deepspeed.zero_stage={s}", "train.compile=true"] for s in (1, 2, 3)})
    cases["zero2+offload"] = ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]
    cases["zero1-bf16"] = ["deepspeed.zero_stage=1", "precision=bf16"]
    cases["zero2-bf16"] = ["deepspeed.zero_stage=2", "precision=bf16"]
    for name, extra in cases.items():
        cfg = load_config(TINY, _overrides(shard_dir, Path(root) / name, "precision=fp32", *extra))
        results[name] = _train_a_few_steps(cfg, place)
    seed_rank_streams(cfg.train.seed, 0, rank)
    results["rule_draw"] = torch.rand(4).tolist()
    return results


@pytest.fixture(scope="module")
def engine_cases(shard_dir, tmp_path_factory) -> list[dict]:
    return run_distributed(_engine_cases, 2, str(shard_dir), str(tmp_path_factory.mktemp("engine_cases")))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_compile_through_the_engine_gives_the_eager_losses_at_zero_1_2_3(engine_cases, stage: int) -> None:
    eager, compiled = engine_cases[0][f"zero{stage}"], engine_cases[0][f"zero{stage}+compile"]
    print(f"ZeRO-{stage} eager {eager['losses']}\n        compiled {compiled['losses']}")
    assert compiled["compiled"] and not eager["compiled"]  # engine.compile(), after deepspeed.initialize
    assert len(compiled["losses"]) == len(eager["losses"]) == STEPS
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)


@pytest.mark.slow
def test_every_rank_draws_its_own_random_stream_by_the_resume_rule(engine_cases) -> None:
    draws = [r["zero1"]["rng_draw"] for r in engine_cases]
    assert draws[0] != draws[1], "ranks share a dropout stream"
    # The same rule (seed_rank_streams at step 0) as a resume on another world size uses at its step.
    assert [r["rule_draw"] for r in engine_cases] == draws


@pytest.mark.slow
def test_bf16_engines_sum_gradients_in_fp32_and_overlap_the_zero2_reduction(engine_cases) -> None:
    zero1, zero2 = engine_cases[0]["zero1-bf16"], engine_cases[0]["zero2-bf16"]
    assert zero1["data_types"] == zero2["data_types"] == ["torch.bfloat16", "torch.float32"]
    assert zero1["optimizer"] == "BF16_Optimizer"  # DeepSpeed's ZeRO-1 path for fp32 accumulation
    assert zero2["optimizer"] == "DeepSpeedZeroOptimizer" and zero2["overlap_comm"]
    assert engine_cases[0]["zero1"]["overlap_comm"]  # fp32 ZeRO-1
    for case in (zero1, zero2):
        assert len(case["losses"]) == STEPS and all(abs(a - b) < 0.05 for a, b in
                                                    zip(case["losses"], engine_cases[0]["zero2"]["losses"]))


@pytest.mark.slow
def test_offloaded_optimizer_steps_with_deepspeeds_cpu_adam(engine_cases) -> None:
    offload, on_device = engine_cases[0]["zero2+offload"], engine_cases[0]["zero2"]
    assert "DeepSpeedCPUAdam" in offload["optimizer_classes"]
    assert "DeepSpeedCPUAdam" not in on_device["optimizer_classes"]
    print(f"offload {offload['losses']}\non device {on_device['losses']}")
    assert offload["losses"] == pytest.approx(on_device["losses"], rel=1e-4)


def _host_reads(rank: int, world_size: int, shard_dir: str, root: str) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    from dist_train import distributed
    from dist_train.train.signals import StopRequest
    from dist_train.train.step import train_step, validation_loss
    from dist_train.train.trainer import Run

    class HostReads(TorchDispatchMode):
        """Counts tensor-to-Python reads (`.item()`): on a GPU each one waits for the queued kernels."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.ours: list[str] = []  # the dist_train function that asked for each read

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten._local_scalar_dense.default:
                self.count += 1
                frame = sys._getframe(1)
                while frame is not None and "/dist_train/" not in frame.f_code.co_filename:
                    frame = frame.f_back
                if frame is not None:
                    self.ours.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
            return func(*args, **(kwargs or {}))

    cfg = load_config(TINY, _overrides(shard_dir, Path(root) / "zero0", "deepspeed.zero_stage=0",
                                       "precision=fp32"))
    run = Run.set_up(cfg, distributed.discover(), torch.device("cpu"), "none")
    reads = {}
    for measure in (False, True, False):
        with HostReads() as seen:
            train_step(run.engine, run.optimizer, run.train_data, run.accum, run.device, StopRequest(), measure)
        reads[f"step{'+norm' if measure else ''}"] = seen.count
        reads[f"step{'+norm' if measure else ''} in dist_train"] = seen.ours
    for eval_steps in (2, 4):
        cfg.train.eval_steps = eval_steps
        with HostReads() as seen:
            validation_loss(run.engine, cfg, run.layout, run.device)
        reads[f"eval{eval_steps}"] = seen.count
    run.logger.close()
    run.engine.destroy()
    return reads


@pytest.mark.slow
def test_gradient_norm_and_validation_are_read_to_the_host_only_when_needed(shard_dir, tmp_path) -> None:
    reads = run_distributed(_host_reads, 1, str(shard_dir), str(tmp_path))[0]
    print(reads)
    # A ZeRO-0 step reads its gradient norm to the host only on a log step (measure_grad_norm); otherwise our
    # code's only reads are torch AdamW's own (its step count, under our skippable step()) and the step's one
    # all-reduce of (loss, bad flag, stop flag).
    assert reads["step+norm"] == reads["step"] + 1
    assert set(reads["step in dist_train"]) <= {"optim.py:step", "step.py:reduce_step", "collectives.py:sum_over_ranks"}
    # An evaluation reads its summed loss once, whatever the number of batches.
    assert reads["eval4"] == reads["eval2"]


def _reduced_bf16_gradient(rank: int, world_size: int, stage: int, overrides: list[str]) -> float:
    """One SGD step (lr 1) of a 1-weight bf16 model whose gradient is 1 on rank 0 and 2^-9 on rank 1, under the
    generated ds_config: the fp32 master weight moves by minus the data-parallel mean gradient as reduced."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = load_config(TINY, [f"deepspeed.zero_stage={stage}", "precision=bf16", "train.grad_accum_steps=1",
                             "train.micro_batch_size=1", "train.global_batch_size=2", *overrides])
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=deepspeed_config(cfg, world_size))
    x = torch.tensor([[1.0 if rank == 0 else 2.0**-9]], dtype=torch.bfloat16)  # d(sum of w x)/dw = x, exact
    engine.backward(engine(x).float().sum())
    engine.step()
    return float(safe_get_full_fp32_param(next(engine.module.parameters())).item())


def _reduced_bf16_gradients(rank: int, world_size: int) -> dict:
    return {f"zero{stage}{'-bf16-accum' if bf16 else ''}": _reduced_bf16_gradient(
                rank, world_size, stage, ["deepspeed.grad_accum_dtype=bf16"] if bf16 else [])
            for stage in (1, 2, 3) for bf16 in (False, True)}


@pytest.mark.slow
def test_bf16_gradients_are_averaged_over_ranks_in_fp32_at_zero_1_2_3() -> None:
    """The fp32 sum of the micro-batches is not rounded back to bf16 for the all-reduce (DeepSpeed's default
    communication dtype under bf16): the mean of 1 and 2^-9 is 0.5 + 2^-10 in fp32, and 0.5 in bf16, whose 8-bit
    mantissa cannot hold it. With deepspeed.grad_accum_dtype=bf16 the reduction stays in bf16, as DeepSpeed does."""
    weights = run_distributed(_reduced_bf16_gradients, 2)[0]
    print(weights)
    for stage in (1, 2, 3):
        assert weights[f"zero{stage}"] == -(0.5 + 2.0**-10), f"ZeRO-{stage} reduced the gradients in bf16"
        assert weights[f"zero{stage}-bf16-accum"] == -0.5

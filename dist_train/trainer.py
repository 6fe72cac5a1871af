"""The training loop, top to bottom: set up, resume, train, evaluate, checkpoint, stop.

One code path for one process, N processes and N nodes: the launcher's environment says where this process
sits (dist_train.distributed), DeepSpeed does data parallelism and ZeRO from the generated ds_config.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_train import distributed
from dist_train.checkpoint import Checkpointer, TrainState, plan_resume
from dist_train.config import Config, deepspeed_config
from dist_train.data import TokenLoader
from dist_train.distributed import ProcessPlace, Rank0
from dist_train.metrics import ForwardTimer, MetricsLogger, build_logger, gather_rank_throughput
from dist_train.model import build_model
from dist_train.optim import SkippableAdamW, build_optimizer, build_scheduler, retarget_scheduler
from dist_train.prefetch import Prefetcher
from dist_train.preflight import preflight
from dist_train.scaling import flops_per_token, peak_flops
from dist_train.signals import EXIT_PREEMPTED, StopRequest

EXIT_COMPLETED = 0
EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row: requeueing would repeat them


class TooManyBadSteps(RuntimeError):
    """Raised after train.max_bad_steps non-finite losses in a row; the last good checkpoint is intact."""


@dataclass
class StepResult:
    loss: float
    """Mean loss over the step's micro-batches and all ranks (nan when any rank's loss was not finite)."""
    skipped: bool
    """True when the update was skipped for a non-finite loss."""
    stop_requested: bool
    """True when any rank received a stop signal."""
    grad_norm: float | None = None
    """Global gradient norm before clipping (when measured)."""
    lr: float | None = None
    """Learning rate the step used."""


def train(cfg: Config, resume: str = "latest") -> int:
    """Train to cfg.train.max_steps (resuming when a checkpoint exists); return the process exit code."""
    place = distributed.discover()
    preflight(cfg, place.world_size)
    stop = StopRequest().install()  # first: a preemption signal during start-up must not kill the process
    run = Run.set_up(cfg, place, resume)
    t, state = cfg.train, run.state

    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        result = run.step(stop, measure_grad_norm=log_now)
        try:
            count_bad_step(state, result, t.max_bad_steps)
        except TooManyBadSteps as e:
            run.rank0.run(print, f"error: {e} Latest checkpoint: step {run.saved_step}.", file=sys.stderr,
                          flush=True)
            return run.close(EXIT_DIVERGED)
        if log_now:
            run.log_step(result)
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            run.log_eval()
        if result.stop_requested and state.step < t.max_steps:
            run.save()
            run.rank0.print(f"stop signal ({stop.signal_name or 'on another rank'}): saved step {state.step}, "
                            f"exiting with {EXIT_PREEMPTED} so the job can be requeued")
            return run.close(EXIT_PREEMPTED)
        # Not within a streak of skipped steps: pruning would then drop the last good checkpoint.
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and not state.consecutive_bad_steps:
            run.save()

    val_loss = run.log_eval() if t.eval_every else None
    if run.saved_step != state.step:
        run.save()
    state.wall_s = run.clock.total()
    run.logger.summary({
        "final_step": state.step, "train_loss": state.last_loss, "val_loss": val_loss, "tokens": state.tokens,
        "wall_s": state.wall_s, "tokens_per_s": state.tokens / state.wall_s if state.wall_s else None,
        "skipped_steps": state.skipped_steps, "world_size": place.world_size})
    run.rank0.print(f"done: step {state.step}, train_loss {state.last_loss:.4f}, val_loss {val_loss}, "
                    f"run folder {run.dir.resolve()}")
    return run.close(EXIT_COMPLETED)


@dataclass
class Run:
    """Everything one training invocation holds: engine, data, checkpoints, logger, counters."""

    cfg: Config
    place: ProcessPlace
    rank0: Rank0
    dir: Path
    device: torch.device
    engine: Any
    optimizer: SkippableAdamW
    train_data: TokenLoader | Prefetcher
    checkpointer: Checkpointer
    logger: MetricsLogger
    forward_timer: ForwardTimer
    state: TrainState
    accum: int
    saved_step: int
    clock: WallClock
    window: StepWindow
    flops_per_step: int
    """Training FLOPs of one optimizer step over all ranks (for MFU; an hf_config count builds a meta model)."""
    peak_flops: float | None
    """This device's dense peak FLOP/s, None where none is published (the CPU)."""

    @classmethod
    def set_up(cls, cfg: Config, place: ProcessPlace, resume: str) -> Run:
        device = distributed.init(place)
        deepspeed = distributed.import_deepspeed()
        rank0 = Rank0(place)
        run_dir = Path(cfg.run.out_dir)
        plan = plan_resume(run_dir, cfg, place, resume)  # refuses an incompatible config before files change
        ds_config = deepspeed_config(cfg, place.world_size, load_universal=plan is not None and plan.universal)
        rank0.run(write_run_files, run_dir, cfg, ds_config)

        torch.manual_seed(cfg.train.seed)
        model = build_partitioned_model(cfg, ds_config, deepspeed)
        if cfg.train.compile:
            # In place: parameter names stay the same (checkpoints, export). The whole model rather than each
            # block (torchtitan's choice, a shorter compile) because fusing the head with the loss is a large
            # part of the gain: 1.19x vs 1.04x tokens/s on the tiny config on the CPU.
            model.compile()
        optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda")
        scheduler = build_scheduler(optimizer, cfg.train)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        t = cfg.train
        train_data = TokenLoader(cfg.data.weighted_paths(), "train", cfg.model.seq_len, t.micro_batch_size,
                                 place.rank, place.world_size, t.seed)
        checkpointer = Checkpointer(run_dir, cfg, engine, place)
        state = TrainState()
        if plan is not None:
            state, loader_state = checkpointer.load(plan)
            train_data.load_state_dict(loader_state)
            retarget_scheduler(scheduler, t)  # the checkpoint restored the old run's lr; the config's wins
            rank0.print(plan.describe())
        if cfg.data.num_workers:
            train_data = Prefetcher(train_data, depth=2 * cfg.data.num_workers, pin_memory=device.type == "cuda")
        log_process_places(run_dir, place, rank0, state.step)
        logger = build_logger(cfg, run_dir, place, state, resumed=plan is not None)
        return cls(cfg=cfg, place=place, rank0=rank0, dir=run_dir, device=device, engine=engine,
                   optimizer=optimizer, train_data=train_data, checkpointer=checkpointer, logger=logger,
                   forward_timer=ForwardTimer(engine.module, device),  # each rank's own speed: stragglers show
                   state=state, accum=ds_config["gradient_accumulation_steps"], saved_step=state.step,
                   clock=WallClock(state.wall_s), window=StepWindow(),
                   flops_per_step=flops_per_token(cfg.model) * ds_config["train_batch_size"] * cfg.model.seq_len,
                   peak_flops=peak_flops(device))

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.micro_batch_size * self.accum * self.place.world_size * self.cfg.model.seq_len

    def step(self, stop: StopRequest, measure_grad_norm: bool) -> StepResult:
        """One optimizer step, timed, with the counters advanced."""
        lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (the scheduler steps after it)
        skipped_before = self.engine.skipped_steps
        start = time.perf_counter()
        result = train_step(self.engine, self.optimizer, self.train_data, self.accum, self.device, stop,
                            measure_grad_norm)
        self.window.add(time.perf_counter() - start)
        result.lr = lr
        if self.cfg.precision != "fp16":
            # ZeRO skips an update with non-finite gradients by itself, even at a finite loss. Under fp16 such
            # skips are the loss scaler's normal search for a scale, not a sign of divergence.
            result.skipped |= self.engine.skipped_steps > skipped_before
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        if not result.skipped:
            self.state.last_loss = result.loss
        return result

    def log_step(self, result: StepResult) -> None:
        cfg, state = self.cfg, self.state
        step_seconds = self.window.mean_and_reset()
        record = {
            "step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
            "tokens": state.tokens, "tokens_per_s": self.tokens_per_step / step_seconds,
            "mfu": (self.flops_per_step / step_seconds / (self.peak_flops * self.place.world_size)
                    if self.peak_flops else None),
            "mem_gb": memory_gb(self.device), "skipped_steps": state.skipped_steps,
        }
        record.update(gather_rank_throughput(self.forward_timer, cfg.train.micro_batch_size * cfg.model.seq_len))
        if cfg.precision == "fp16":
            record["loss_scale"] = float(self.engine.optimizer.cur_scale)
        self.logger.log(record)
        self.rank0.print(format_log_line(record, cfg.train.max_steps))

    def log_eval(self) -> float:
        val_loss = evaluate(self.engine, self.cfg, self.place, self.device)
        self.logger.log({"step": self.state.step, "tokens": self.state.tokens, "val_loss": val_loss,
                         "val_ppl": math.exp(min(val_loss, 50))})
        self.rank0.print(f"step {self.state.step} | val_loss {val_loss:.4f}")
        return val_loss

    def save(self) -> None:
        self.state.wall_s = self.clock.total()
        self.checkpointer.save(self.state, self.train_data.state_dict())
        self.saved_step = self.state.step

    def close(self, exit_code: int) -> int:
        self.logger.close()
        distributed.shutdown()
        return exit_code


def build_partitioned_model(cfg: Config, ds_config: dict[str, Any], deepspeed: Any) -> torch.nn.Module:
    """The model; at ZeRO-3 each module's weights are partitioned as soon as it is built, so no rank ever holds
    the whole model (a 7B model would otherwise take 27 GB of host memory per process). Our Transformer is built
    inside zero.Init and initialises its weights through gathered_for_init; transformers does both itself for
    an hf_config model when given the config."""
    if cfg.deepspeed.zero_stage != 3:
        return build_model(cfg.model)
    if cfg.model.hf_config:
        return build_model(cfg.model, zero3_config=ds_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build_model(cfg.model)


class StepWindow:
    """Seconds per training step since the last log line (evaluation and checkpoints left out)."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def mean_and_reset(self) -> float:
        mean = self.seconds / self.steps
        self.seconds, self.steps = 0.0, 0
        return mean


class WallClock:
    """Seconds of training summed over restarts: what the checkpoint carried plus this invocation's."""

    def __init__(self, carried_s: float):
        self.carried_s = carried_s
        self.start = time.perf_counter()

    def total(self) -> float:
        return self.carried_s + time.perf_counter() - self.start


def train_step(engine: Any, optimizer: SkippableAdamW, data: TokenLoader | Prefetcher, accum: int,
               device: torch.device, stop: StopRequest, measure_grad_norm: bool = False) -> StepResult:
    """One optimizer step: `accum` micro-batches, then the update (skipped on every rank if any rank saw a
    non-finite loss). One all-reduce carries the loss, the bad-loss flag and the stop flag."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on device: no host sync per micro-batch
    for micro in range(accum):
        inputs, targets = data.next_batch()
        loss = engine(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        loss_sum += loss.detach().double()  # nan/inf stay non-finite in the sum
        engine.backward(loss)
        if micro == accum - 1:
            # ZeRO 1-3 check the gradients and record their norm in step(); stage 0 does neither, so read the
            # (already all-reduced) gradients here: a non-finite norm is skipped like a non-finite loss.
            stage0_norm = _module_grad_norm(engine.module) if engine.zero_optimization_stage() == 0 else None
            bad_grads = stage0_norm is not None and not math.isfinite(stage0_norm)
            flags = reduce_step(loss_sum / accum, stop.requested, bad_grads)
            optimizer.skip_next_step = flags.skipped
        engine.step()
    optimizer.skip_next_step = False  # a ZeRO overflow check may have skipped the inner step itself
    if measure_grad_norm:
        flags.grad_norm = stage0_norm if stage0_norm is not None else _engine_grad_norm(engine)
    return flags


def reduce_step(local_loss: torch.Tensor, stop: bool, bad_grads: bool) -> StepResult:
    """Sum (loss if finite, non-finite flag, stop flag) over ranks in one all-reduce."""
    finite = torch.isfinite(local_loss)
    bad = (~finite) | bad_grads
    values = torch.stack([torch.where(finite, local_loss, torch.zeros_like(local_loss)), bad.double(),
                          torch.full_like(local_loss, float(stop))])
    totals = distributed.sum_over_ranks(values).tolist()
    skipped = totals[1] > 0
    return StepResult(loss=math.nan if skipped else totals[0] / distributed.world_size(), skipped=skipped,
                      stop_requested=totals[2] > 0)


def count_bad_step(state: TrainState, result: StepResult, max_bad_steps: int) -> None:
    if not result.skipped:
        state.consecutive_bad_steps = 0
        return
    state.consecutive_bad_steps += 1
    state.skipped_steps += 1
    if state.consecutive_bad_steps >= max_bad_steps:
        raise TooManyBadSteps(
            f"{state.consecutive_bad_steps} steps in a row (up to step {state.step}) had a non-finite loss or "
            f"gradient and were skipped (train.max_bad_steps={max_bad_steps}); stopping. The last good checkpoint "
            f"is intact: lower train.lr, raise train.warmup_steps or use precision=bf16, then re-run to resume.")


@torch.no_grad()
def evaluate(engine: Any, cfg: Config, place: ProcessPlace, device: torch.device) -> float:
    """Mean loss over the first train.eval_steps validation batches (the same batches every time)."""
    val_data = TokenLoader(cfg.data.weighted_paths(), "val", cfg.model.seq_len, cfg.train.micro_batch_size,
                           place.rank, place.world_size, cfg.train.seed)
    engine.eval()
    total = 0.0
    for _ in range(cfg.train.eval_steps):
        inputs, targets = val_data.next_batch()
        total += engine(inputs.to(device), targets.to(device)).float().item()
    engine.train()
    return distributed.mean_over_ranks(total / cfg.train.eval_steps)


def _module_grad_norm(module: torch.nn.Module) -> float | None:
    """Norm of the gradients held by the module (None when DeepSpeed keeps them elsewhere, e.g. bf16)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None


def _engine_grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def format_log_line(r: dict[str, Any], max_steps: int) -> str:
    grad = f"{r['grad_norm']:.3f}" if r["grad_norm"] is not None else "n/a"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (f"step {r['step']}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad_norm {grad} | "
            f"{r['tokens_per_s']:,.0f} tok/s | mfu {mfu} | mem {r['mem_gb']:.2f} GB")


def write_run_files(run_dir: Path, cfg: Config, ds_config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def log_process_places(run_dir: Path, place: ProcessPlace, rank0: Rank0, step: int) -> None:
    """Append where every rank ran (host, SLURM node, restart count) to RUN/ranks.jsonl, one line per rank."""
    places = distributed.all_gather_objects(place)

    def write() -> None:
        with open(run_dir / "ranks.jsonl", "a") as f:
            f.writelines(json.dumps({"start_step": step, "time": time.time(), "rank": p.rank,
                                    "local_rank": p.local_rank, "world_size": p.world_size, "host": p.host,
                                    "slurm_node": p.slurm_node, "slurm_job_id": p.slurm_job_id,
                                    "slurm_restart_count": p.slurm_restart_count}) + "\n" for p in places)

    rank0.run(write)
    if place.slurm_job_id:
        rank0.print(f"SLURM job {place.slurm_job_id}, restart count {place.slurm_restart_count}")

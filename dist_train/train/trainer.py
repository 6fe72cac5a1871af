"""The training loop, top to bottom: set up, resume, train, evaluate, checkpoint, stop.

One code path for one process, N processes and N nodes: the launcher's environment says where this process
sits (dist_train.distributed), DeepSpeed does data parallelism and ZeRO from the generated ds_config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_train import distributed
from dist_train.checkpoint.layout import TrainState
from dist_train.checkpoint.resume import check_before_launch, plan_resume
from dist_train.checkpoint.rng import seed_rank_streams
from dist_train.checkpoint.save import Checkpointer, SaveFailed
from dist_train.checkpoint.shared_folder import check_shared_run_dir
from dist_train.config import Config
from dist_train.data.build import build_loader
from dist_train.data.prefetch import Prefetcher
from dist_train.distributed.environment import ProcessPlace
from dist_train.distributed.process_group import configure_matmul_precision
from dist_train.distributed.rank0 import Rank0
from dist_train.engine.build import build_partitioned_model
from dist_train.engine.ds_config import deepspeed_config
from dist_train.engine.parallel import ParallelLayout, set_up_parallel
from dist_train.model.build import model_vocab_size
from dist_train.model.count import flops_per_token
from dist_train.monitor.memory import window_memory_gib
from dist_train.monitor.metrics import MetricsLogger, build_logger
from dist_train.monitor.throughput import ForwardTimer, gather_rank_throughput, math_mode, peak_flops
from dist_train.train.optim import Skippable, build_optimizer, build_scheduler, retarget_scheduler
from dist_train.train.preflight import preflight
from dist_train.train.run_lock import run_folder_lock
from dist_train.train.signals import EXIT_PREEMPTED, StopRequest, fail_writes_over_the_file_size_limit
from dist_train.train.spikes import Spike, SpikeDetector
from dist_train.train.task_eval import TaskEvaluation
from dist_train.train.step import (
    EXIT_DIVERGED,
    Batches,
    StepResult,
    TooManyBadSteps,
    count_bad_step,
    loss_scale,
    train_step,
    validation_loss,
)

EXIT_COMPLETED = 0
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR: a save hit ENOSPC / EDQUOT / EFBIG; `latest` is the previous checkpoint


def train(cfg: Config, resume: str = "latest") -> int:
    """Train to cfg.train.max_steps (resuming when a checkpoint exists); return the process exit code."""
    place = distributed.discover()
    # Reads only: a refusal changes nothing.
    finished = check_before_launch(Path(cfg.run.out_dir), cfg, resume, place.world_size)
    if finished:
        Rank0(place).print(finished)
        return EXIT_COMPLETED
    preflight(cfg, place.world_size)
    stop = StopRequest().install()  # first: a preemption signal during start-up must not kill the process
    fail_writes_over_the_file_size_limit()
    device = distributed.init(place)
    with run_folder_lock(Path(cfg.run.out_dir), place, cfg.run.lock):  # before anything in the folder is written
        run = Run.set_up(cfg, place, device, resume)
        try:
            exit_code = train_loop(run, stop)
            run.checkpointer.finish()  # a background save still being written
            return run.close(exit_code)
        except SaveFailed as e:
            if not e.disk_full:
                raise
            run.rank0.run(print, f"error: {e}. Stopping with exit code {EXIT_DISK_FULL}: free space (or raise the "
                                 f"quota or file-size limit) under {run.checkpointer.dir}, then re-run the same "
                                 f"command to resume from the latest checkpoint.", file=sys.stderr, flush=True)
            return run.close(EXIT_DISK_FULL)


def train_loop(run: Run, stop: StopRequest) -> int:
    """Steps until max_steps, a stop signal or a divergence; returns the exit code."""
    cfg, t, state = run.cfg, run.cfg.train, run.state
    while state.step < t.max_steps:
        log_now = (state.step + 1) % t.log_every == 0 or state.step + 1 == t.max_steps
        result = run.step(stop, measure_grad_norm=log_now)
        run.checkpointer.poll()  # publishes a background save (checkpoint.async_save) once it is written
        try:
            count_bad_step(state, result, t.max_bad_steps)
        except TooManyBadSteps as e:
            run.rank0.run(print, f"error: {e} Latest checkpoint: step {run.saved_step}.", file=sys.stderr,
                          flush=True)
            return EXIT_DIVERGED
        if log_now:
            run.log_step(result)
        spike = run.spikes.observe(state.step, result.loss) if run.spikes and not result.skipped else None
        if spike is not None and run.roll_back(spike):
            continue  # back at the checkpoint before the spike; the data read since then is skipped
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            run.log_eval()
        if result.stop_requested and state.step < t.max_steps:
            stop.ignore_further()
            run.save()
            run.rank0.print(f"stop signal ({stop.signal_name or 'on another rank'}): saved step {state.step}, "
                            f"exiting with {EXIT_PREEMPTED} so the job can be requeued")
            return EXIT_PREEMPTED
        # Not within a streak of skipped steps (pruning would then drop the last good checkpoint), nor while a
        # loss spike may be starting (the rollback needs a checkpoint from before it).
        spike_suspected = run.spikes is not None and run.spikes.suspect
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and not state.consecutive_bad_steps
                and not spike_suspected):
            run.save(wait=False)
        if run.tasks is not None and run.tasks.due(state.step, run.saved_step):
            run.evaluate_tasks()

    val_loss = run.log_eval() if t.eval_every else None
    if run.saved_step != state.step:
        run.save()
    run.checkpointer.finish()  # the last checkpoint is published before the run says it is done
    if run.tasks is not None and run.tasks.last_step != state.step:
        run.evaluate_tasks()
    state.wall_s = run.clock.total()
    run.logger.summary({
        "final_step": state.step, "train_loss": state.last_loss, "val_loss": val_loss, "tokens": state.tokens,
        "wall_s": state.wall_s, "tokens_per_s": state.tokens / state.wall_s if state.wall_s else None,
        "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks, "world_size": run.place.world_size})
    run.rank0.print(f"done: step {state.step}, train_loss {state.last_loss:.4f}, val_loss {val_loss}, "
                    f"run folder {run.dir.resolve()}")
    return EXIT_COMPLETED


@dataclass
class Run:
    """Everything one training invocation holds: engine, data, checkpoints, logger, counters."""

    cfg: Config
    place: ProcessPlace
    layout: ParallelLayout
    rank0: Rank0
    dir: Path
    device: torch.device
    engine: Any
    optimizer: Skippable
    train_data: Batches
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
    """This device's dense peak FLOP/s in the run's math (bf16/fp16, TF32 or fp32), None where none is
    published (the CPU)."""
    spikes: SpikeDetector | None
    """Loss-spike detection, when train.max_rollbacks > 0."""
    tasks: TaskEvaluation | None
    """lm-eval tasks on published checkpoints, when eval.tasks is set."""

    @classmethod
    def set_up(cls, cfg: Config, place: ProcessPlace, device: torch.device, resume: str) -> Run:
        configure_matmul_precision(device, cfg.train.tf32)
        deepspeed = distributed.import_deepspeed()
        rank0 = Rank0(place)
        run_dir = Path(cfg.run.out_dir)
        check_shared_run_dir(run_dir, place)  # before any rank reads checkpoints or writes its part of one
        plan = plan_resume(run_dir, cfg, place, resume)  # refuses an incompatible config before files change
        tasks = TaskEvaluation(cfg, rank0, device) if cfg.eval.tasks else None  # refuses unknown task names
        ds_config = deepspeed_config(cfg, place.world_size, load_universal=plan is not None and plan.universal)

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_partitioned_model(cfg, ds_config, deepspeed, place.rank)
        layout = ParallelLayout.of(cfg, place.rank, place.world_size)
        mpu = set_up_parallel(cfg, model)
        optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda",
                                    offloaded=cfg.deepspeed.offload_optimizer)
        scheduler = build_scheduler(optimizer, cfg.train)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, mpu=mpu)
        if cfg.train.compile:
            # DeepSpeed's path: the engine compiles its module in place after installing its ZeRO hooks, so
            # the hooks are not traced into the graph (parameter names stay the same: checkpoints, export). The
            # whole model rather than each block (torchtitan's choice, a shorter compile) because fusing the
            # head with the loss is a large part of the gain: 1.19x vs 1.04x tokens/s on the tiny config on the CPU.
            engine.compile()
        t = cfg.train
        seed_rank_streams(t.seed, 0, place.rank)  # each rank its own dropout masks; a resume restores or reseeds
        train_data = build_loader(cfg, "train", layout.data_rank, layout.data, model_vocab_size(cfg)[0],
                                  sequence_rank=layout.sequence_rank, sequence_size=layout.sequence)
        checkpointer = Checkpointer(run_dir, cfg, engine, place)
        state = TrainState()
        if plan is not None:
            state, loader_state = checkpointer.load(plan)
            train_data.load_state_dict(loader_state)
            retarget_scheduler(scheduler, t)  # the checkpoint restored the old run's lr; the config's wins
            rank0.print(plan.describe())
        # Only now, with the checkpoint and the loader position accepted: a refused resume leaves the old config.
        rank0.run(write_run_files, run_dir, cfg, ds_config)
        if cfg.data.num_workers:
            train_data = Prefetcher(train_data, depth=2 * cfg.data.num_workers, pin_memory=device.type == "cuda")
        log_process_places(run_dir, place, rank0, state.step)
        logger = build_logger(cfg, run_dir, place, state, resumed=plan is not None)
        for event in plan.events if plan is not None else []:  # corrupt checkpoints set aside on the way
            logger.event({"step": state.step, **event})
        return cls(cfg=cfg, place=place, layout=layout, rank0=rank0, dir=run_dir, device=device, engine=engine,
                   optimizer=optimizer, train_data=train_data, checkpointer=checkpointer, logger=logger,
                   forward_timer=ForwardTimer(engine.module, device),  # each rank's own speed: stragglers show
                   state=state, accum=ds_config["gradient_accumulation_steps"], saved_step=state.step,
                   clock=WallClock(state.wall_s), window=StepWindow(),
                   flops_per_step=flops_per_token(cfg.model, cfg.data.noise_density, cfg.data.mean_noise_span_length)
                   * ds_config["train_batch_size"] * cfg.model.seq_len,
                   peak_flops=peak_flops(device, math_mode(cfg.precision)),
                   spikes=SpikeDetector(t.spike_window, t.spike_margin, t.spike_steps) if t.max_rollbacks else None,
                   tasks=tasks)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.micro_batch_size * self.accum * self.layout.data * self.cfg.model.seq_len

    def step(self, stop: StopRequest, measure_grad_norm: bool) -> StepResult:
        """One optimizer step, timed, with the counters advanced."""
        lr = self.optimizer.param_groups[0]["lr"]  # what this step uses (the scheduler steps after it)
        skipped_before = self.engine.skipped_steps
        start = time.perf_counter()
        result = train_step(self.engine, self.optimizer, self.train_data, self.accum, self.device, stop,
                            measure_grad_norm, slices=self.layout.sequence)
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
            **window_memory_gib(self.device), "skipped_steps": state.skipped_steps,
        }
        tokens_per_forward = cfg.train.micro_batch_size * cfg.model.seq_len // self.layout.sequence  # a slice
        record.update(gather_rank_throughput(self.forward_timer, tokens_per_forward))
        router_window = getattr(self.engine.module, "router_window", None)
        if router_window is not None:  # MoE: router losses, expert load and dropped tokens of the window
            record.update(router_window.take())
        z_loss = getattr(self.engine.module, "z_loss", None)
        if z_loss is not None:  # train.z_loss: the mean log(Z)^2 of the window
            record.update(z_loss.take(self.layout.sequence))
        if cfg.precision == "fp16":
            # As Megatron logs them: the scale, and the steps the scaler skipped for an overflow (DeepSpeed's count,
            # kept in its checkpoints), which train.max_bad_steps does not count.
            record["loss_scale"] = loss_scale(self.engine.optimizer)
            record["overflow_steps"] = self.engine.skipped_steps
        self.logger.log(record)
        self.rank0.print(format_log_line(record, cfg.train.max_steps))

    def log_eval(self) -> float:
        val_loss = validation_loss(self.engine, self.cfg, self.layout, self.device)
        self.logger.log({"step": self.state.step, "tokens": self.state.tokens, "val_loss": val_loss,
                         "val_ppl": math.exp(min(val_loss, 50))})
        self.rank0.print(f"step {self.state.step} | val_loss {val_loss:.4f}")
        return val_loss

    def evaluate_tasks(self) -> None:
        """eval.tasks on this step's checkpoint, once it is published (a background save is waited for)."""
        self.checkpointer.finish()
        self.tasks.run(self.dir, self.state.step, self.state.tokens, self.logger)

    def save(self, wait: bool = True) -> None:
        """Save a checkpoint; without `wait` (and with checkpoint.async_save) it is published a few steps later."""
        self.state.wall_s = self.clock.total()
        self.checkpointer.save(self.state, self.train_data.state_dict(), wait=wait)
        self.saved_step = self.state.step
        self.logger.log({"step": self.state.step, **self.checkpointer.timings})  # how long training stopped

    def roll_back(self, spike: Spike) -> bool:
        """Back to the newest checkpoint before the spike, the data loader left where it is (so the samples read
        since that checkpoint are skipped); False, with the spike logged, when no rollback is left or possible."""
        record = {"step": self.state.step, "event": "loss_spike", "spike_first_step": spike.first_step,
                  "spike_last_step": spike.last_step, "spike_losses": spike.losses, "baseline_loss": spike.baseline}
        consumed = self.train_data.state_dict()["consumed_samples"]
        rollbacks = self.state.rollbacks + 1
        loaded = None
        if rollbacks <= self.cfg.train.max_rollbacks:
            loaded, corrupt = self.checkpointer.load_before(spike.first_step)
            for event in corrupt:
                self.logger.event({"step": self.state.step, **event})
        if loaded is None:
            why = ("no rollback left" if rollbacks > self.cfg.train.max_rollbacks else
                   "no checkpoint of this world size before it")
            self.rank0.print(f"warning: loss spike at steps {spike.first_step}-{spike.last_step} (losses "
                             f"{[round(x, 3) for x in spike.losses]}, mean before {spike.baseline:.3f}); {why} "
                             f"(train.max_rollbacks={self.cfg.train.max_rollbacks}): training on")
            self.logger.event({**record, "rolled_back": False})
            return False
        state, loader_state = loaded
        for f in dataclasses.fields(TrainState):  # in place: the loop holds this object
            setattr(self.state, f.name, getattr(state, f.name))
        self.state.rollbacks, self.saved_step = rollbacks, state.step
        self.spikes.rewind(state.step)
        self.logger.rewind(state.step)
        first_skipped = loader_state["consumed_samples"]
        samples_per_batch = self.tokens_per_step // self.cfg.model.seq_len
        record.update(step=state.step, rolled_back=True, rolled_back_to_step=state.step, rollbacks=rollbacks,
                      steps_undone=spike.last_step - state.step, skipped_samples_from=first_skipped,
                      skipped_samples_to=consumed, skipped_batches=(consumed - first_skipped) // samples_per_batch)
        self.logger.event(record)
        self.rank0.print(f"LOSS SPIKE at steps {spike.first_step}-{spike.last_step} (losses "
                         f"{[round(x, 3) for x in spike.losses]}, mean before {spike.baseline:.3f}): rolled back to "
                         f"step {state.step} (rollback {rollbacks} of {self.cfg.train.max_rollbacks}), skipping "
                         f"{record['skipped_batches']} batches = global samples [{first_skipped}, {consumed})")
        return True

    def close(self, exit_code: int) -> int:
        self.logger.close()
        distributed.shutdown()
        return exit_code


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


def format_log_line(r: dict[str, Any], max_steps: int) -> str:
    grad = f"{r['grad_norm']:.3f}" if r["grad_norm"] is not None else "n/a"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    reserved = f" ({r['mem_reserved_gib']:.2f} reserved)" if r["mem_reserved_gib"] is not None else ""
    scaler = (f" | loss scale {r['loss_scale']:g} ({r['overflow_steps']} overflows)"
              if r.get("loss_scale") is not None else "")
    z_loss = f" | z_loss {r['z_loss']:.4f}" if r.get("z_loss") is not None else ""
    return (f"step {r['step']}/{max_steps} | loss {r['loss']:.4f}{z_loss} | lr {r['lr']:.2e} | grad_norm {grad} | "
            f"{r['tokens_per_s']:,.0f} tok/s | mfu {mfu} | mem {r['mem_gib']:.2f} GiB{reserved}{scaler}")


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

"""Shared pieces of the checkpoint, resume, export and averaging tests: a small fp32 run, training processes
started in the background (to kill or signal them), and reference runs shared by several test modules.

`shared_run(...)` trains a run once per pytest session (under the session's base temp folder, keyed by name)
and returns its folder, so the uninterrupted reference of the kill test is also the source of the
world-size, export, averaging and evaluation tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from distributed_helpers import REPO, cpu_env, free_port

from dist_train.checkpoint.weights import checkpoint_weights

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 6
EVERY = 2
GLOBAL_BATCH = 8


def overrides(shard_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """A 2-layer tiny model, fp32, global batch 8 at any world size, a log line and metrics every step."""
    return [f"data.path={shard_dir}", f"run.out_dir={out_dir}", "model.n_layers=2", "precision=fp32",
            "train.micro_batch_size=4", f"train.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.eval_every=0", f"checkpoint.every={EVERY}", "checkpoint.keep_last=0",
            *extra]


def command(overrides_: list[str], nproc: int, launcher: str = "torchrun", args: tuple[str, ...] = ()) -> list[str]:
    script = [str(REPO / "launch" / "train.py"), "--config", str(TINY), *args, *overrides_]
    port = str(free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}", *script]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}", *script]
    assert launcher == "python" and nproc == 1
    return [sys.executable, *script]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Start a training command in the background, output appended to `log`."""
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(env), stdout=f, stderr=subprocess.STDOUT, **popen)


SLOW_SAVE_HOOK = """
import sys
if sys.argv and sys.argv[0].endswith("launch/train.py"):  # the trainers only, not the launchers
    import time
    from dist_train.checkpoint import save

    _publish = save.Checkpointer._publish

    def _slow_publish(self, *args, **kwargs):
        time.sleep({seconds})  # as an fsync of a large model to a busy filesystem would
        return _publish(self, *args, **kwargs)

    save.Checkpointer._publish = _slow_publish
"""


def slow_save_env(hook_dir: Path, seconds: float) -> dict[str, str]:
    """An environment whose trainers take `seconds` longer to publish each checkpoint (rank 0 sleeps before
    it renames the folder and writes `latest`): a `sitecustomize` module on PYTHONPATH wraps the real save."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SLOW_SAVE_HOOK.format(seconds=seconds))
    return {"PYTHONPATH": f"{hook_dir}{os.pathsep}{cpu_env()['PYTHONPATH']}"}


def run(cmd: list[str], log: Path, timeout: float = 600) -> int:
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a launcher and every process under it (torchrun starts its workers in new sessions)."""
    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    if sig == signal.SIGKILL:
        psutil.wait_procs(tree, timeout=30)
        proc.wait()


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes (those running launch/train.py) under a launcher."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any(arg.endswith("launch/train.py") for arg in p.cmdline()) and "deepspeed.launcher" not in
            " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())]


def logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 300, poll_s: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited with {proc.returncode} before the awaited moment"
        assert time.monotonic() < deadline, "timed out waiting for the training run"
        time.sleep(poll_s)


def kill_while_writing_a_save(cmd: list[str], log: Path, checkpoints: Path) -> tuple[int, Path]:
    """Start a run and SIGKILL it while a save after the first one is being written (its temporary folder holds
    files, nothing is published yet); return the step of that save and its temporary folder."""

    def writing() -> list[Path]:
        return [p for p in checkpoints.glob(".tmp_step_*")
                if int(p.name[-8:]) > EVERY and any(p.glob("step_*/*.pt"))] if checkpoints.exists() else []

    proc = start(cmd, log)
    wait_until(lambda: bool(writing()), proc, poll_s=0.0002)
    kill_tree(proc)
    partial = writing()
    assert partial, "the kill landed after the save was published; no partial checkpoint to test"
    return int(partial[0].name[-8:]), partial[0]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def shared_run(tmp_path_factory: pytest.TempPathFactory, shard_dir: Path, name: str, nproc: int,
               *extra: str) -> Path:
    """An uninterrupted run trained once per session and shared by the test modules that read it."""
    run_dir = tmp_path_factory.getbasetemp() / "shared_runs" / name
    done = run_dir / "DONE"
    if not done.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        rc = run(command(overrides(shard_dir, run_dir, *extra), nproc), run_dir / "train.log")
        assert rc == 0, f"reference run {name} failed ({rc}):\n{(run_dir / 'train.log').read_text()[-4000:]}"
        done.write_text("")
    return run_dir


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def optimizer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's optimizer shard (ZeRO 1-3): fp32 master weights and Adam moments."""
    out = {}
    for path in sorted(ckpt.glob("*_optim_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        _collect(state, path.name, out)
    assert out, f"no optimizer shards in {ckpt}"
    return out


def _collect(value, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if torch.is_tensor(value):
        out[prefix] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            _collect(v, f"{prefix}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _collect(v, f"{prefix}.{i}", out)


def assert_same_end(run_dir, reference) -> None:
    """Same losses at every step, same final weights and optimizer shards, bit for bit."""
    ours, theirs = losses(run_dir), losses(reference)
    print(f"losses: {ours}")
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert ours == theirs
    a, b = checkpoint_weights(checkpoint(run_dir, STEPS)), checkpoint_weights(checkpoint(reference, STEPS))
    assert a.names == b.names
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name
    oa, ob = optimizer_tensors(checkpoint(run_dir, STEPS)), optimizer_tensors(checkpoint(reference, STEPS))
    assert oa.keys() == ob.keys()
    assert any("exp_avg_sq" in k for k in oa), "the optimizer shards hold Adam's moments"
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key
    print(f"{len(a.names)} weight tensors and {len(oa)} optimizer tensors identical")


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.exists() else "(no log)"


def tensor_parallel_logits(rank: int, world_size: int, ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the run's own engine: AutoTP-sharded over 2 processes, the checkpoint loaded by DeepSpeed, the
    model built as the trainer builds it (the document mask of data.document_mask included)."""
    from dist_train.checkpoint.layout import read_client_state
    from dist_train.config import config_from_dict
    from dist_train.distributed import import_deepspeed
    from dist_train.engine.build import documents_eos
    from dist_train.engine.ds_config import deepspeed_config
    from dist_train.engine.parallel import set_up_parallel
    from dist_train.model import document_mask
    from dist_train.model.build import build_model

    path = Path(ckpt)
    cfg = config_from_dict(read_client_state(path)["config"])
    model = build_model(cfg.model)
    document_mask.enable(model, documents_eos(cfg))
    mpu = set_up_parallel(cfg, model)
    engine, *_ = import_deepspeed().initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                               config=deepspeed_config(cfg, world_size), mpu=mpu)
    assert engine.module.blocks[0].attn.q_proj.weight.shape[0] == cfg.model.d_model // 2, "the engine is sharded"
    engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.eval()
    with torch.no_grad():
        return engine(ids).float().clone()

"""The SLURM batch script of a run: a `JobSpec` in, the text of `RUN_DIR/slurm/job.sbatch` out.

The script is the #SBATCH directives, then the run's settings as shell variables, then the fixed body in
`launch/sbatch_template.sh` (which starts the tasks, forwards preemption and requeues). Keeping the body a
real shell file means it is read, linted and reviewed as shell, not as a Python string.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dist_train.train.signals import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "sbatch_template.sh"
TRAIN_SCRIPT = REPO / "launch" / "train.py"

Launcher = Literal["srun", "deepspeed"]
LAUNCHERS: tuple[Launcher, ...] = ("srun", "deepspeed")

# After the first task of a step ends, the others get this long before srun kills them: long enough for the
# last rank to finish writing a checkpoint, short enough that a crashed rank does not leave its peers hanging
# in a collective until the process-group timeout.
STRAGGLER_WAIT_S = 120


class JobSpecError(ValueError):
    """A job request the user must fix; the message says which option and what to do."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the batch script needs; paths are absolute so the job runs from any node."""

    config: Path
    """The training config (YAML)."""
    run_dir: Path
    """The run folder (`run.out_dir`); the script and the logs go to its `slurm/` subfolder."""
    nodes: int
    """Nodes to allocate."""
    gpus_per_node: int
    """GPUs per node = training processes per node (with `cpu`: processes per node, no GPUs asked for)."""
    overrides: tuple[str, ...] = ()
    """Dotted `key=value` config overrides, passed to the trainer as given."""
    launcher: Launcher = "srun"
    """`srun`: one task per GPU; `deepspeed`: one task per node running the deepspeed launcher."""
    cpu: bool = False
    """Train on CPUs (gloo) and ask for no GPUs: for tests and clusters without GPUs."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Time limit in any sbatch format (`HH:MM:SS`, `D-HH:MM`, minutes)."""
    cpus_per_task: int | None = None
    """CPUs per training process."""
    grace_s: int = 300
    """Time to save a checkpoint: USR1 arrives this many seconds (up to 60 s more) before the time limit, and
    after `launch.slurm cancel` the batch script waits this long for the save before killing the step."""
    job_name: str = "dist_train"
    workdir: Path = field(default_factory=Path.cwd)
    """The job runs here, so relative paths in the config and overrides mean what they meant at submission."""
    python: str = sys.executable
    """The interpreter (and so the environment) the tasks run with."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise JobSpecError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise JobSpecError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node} "
                               "(with --cpu it counts training processes per node)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise JobSpecError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.grace_s < 0:
            raise JobSpecError(f"--grace must be >= 0 seconds, got {self.grace_s}")
        if self.launcher not in LAUNCHERS:
            raise JobSpecError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        for name in ("run_dir", "workdir"):
            if re.search(r"\s", str(getattr(self, name))):
                raise JobSpecError(f"{name} {str(getattr(self, name))!r} contains whitespace, which #SBATCH "
                                   "lines cannot carry; choose a path without spaces")

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"

    @property
    def log_pattern(self) -> Path:
        """Where the job's output goes; `%j` is the job id."""
        return self.run_dir / "slurm" / "%j.out"

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.launcher == "srun" else 1

    @property
    def task_cpus(self) -> int | None:
        """CPUs per SLURM task: a deepspeed-launcher task holds all of its node's processes."""
        if self.cpus_per_task is None:
            return None
        return self.cpus_per_task * (self.gpus_per_node // self.tasks_per_node)


def directives(spec: JobSpec) -> list[str]:
    """The #SBATCH options, in the order a reader looks for them."""
    out = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    if not spec.cpu:
        out.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.task_cpus is not None:
        out.append(f"--cpus-per-task={spec.task_cpus}")
    for name in ("partition", "account", "time"):
        if getattr(spec, name):
            out.append(f"--{name}={getattr(spec, name)}")
    out += [
        f"--chdir={spec.workdir}",
        f"--output={spec.log_pattern}",
        # A requeue would otherwise truncate the log of the earlier starts.
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{spec.grace_s}",
    ]
    return out


def step_options(spec: JobSpec) -> list[str]:
    """srun's options for the training step (valid inside an allocation and when srun makes its own)."""
    out = [f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}",
           "--kill-on-bad-exit=0", f"--wait={STRAGGLER_WAIT_S}"]
    if not spec.cpu:
        out.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.task_cpus is not None:
        out.append(f"--cpus-per-task={spec.task_cpus}")
    return out


def allocation_options(spec: JobSpec) -> list[str]:
    """srun's extra options when it has to make the allocation itself (no sbatch, no salloc)."""
    out = [f"--job-name={spec.job_name}"]
    for name in ("partition", "account", "time"):
        if getattr(spec, name):
            out.append(f"--{name}={getattr(spec, name)}")
    return out


def _shell_array(name: str, items: list[str]) -> str:
    return f"{name}=(" + " ".join(shlex.quote(i) for i in items) + ")"


def settings(spec: JobSpec) -> list[str]:
    """The DT_* shell variables the template's body reads."""
    env = ["export DS_ACCELERATOR=cpu"] if spec.cpu else []
    return [
        f"DT_WORKDIR={shlex.quote(str(spec.workdir))}",
        f"DT_SCRIPT={shlex.quote(str(spec.script_path))}",
        f"DT_PYTHON={shlex.quote(spec.python)}",
        f"DT_LAUNCHER={spec.launcher}",
        f"DT_PROCS_PER_NODE={spec.gpus_per_node}",
        f"DT_EXIT_PREEMPTED={EXIT_PREEMPTED}",
        f"DT_GRACE_S={spec.grace_s}",
        _shell_array("DT_TRAIN", [str(TRAIN_SCRIPT), "--config", str(spec.config), *spec.overrides]),
        _shell_array("DT_SRUN_ARGS", step_options(spec)),
        _shell_array("DT_ALLOC_ARGS", allocation_options(spec)),
        # The tasks import dist_train from this checkout even where it is not pip-installed.
        f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
        *env,
    ]


def render(spec: JobSpec) -> str:
    """The complete batch script."""
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives(spec)),
        f"# Written by `python -m launch.slurm submit` for the run in {spec.run_dir}.",
        f"# Submit again with `sbatch {spec.script_path}`; inside `salloc`, or to let srun allocate,",
        f"# run it with `bash {spec.script_path}`.",
        "",
        *settings(spec),
        "",
        TEMPLATE.read_text().rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"

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

# `--signal=B:USR1@grace` holds the grace in 16 bits (SLURM's proc_args.c: get_signal_opts).
MAX_GRACE_S = 0xFFFF

# SLURM's time limit syntax (parse_time.c: time_str2secs), as its manual lists it: minutes, minutes:seconds,
# hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds; 0 or INFINITE / UNLIMITED
# for no limit. SLURM does not range-check the fields (90 minutes may be written 90 or 1:30:00).
_TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME = re.compile(r"(\d+)(?::(\d+))?(?::(\d+))?|(\d+)-(\d+)(?::(\d+))?(?::(\d+))?")
_NO_LIMIT = {"infinite", "unlimited"}

# A partition or account name as clusters define them: letters, digits, '_', '.', '-' (no whitespace, quote,
# '#' or '=', which would end the #SBATCH argument or the slurm.conf entry). --partition may list several.
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_NAMES = {"partition": re.compile(rf"{_NAME}(?:,{_NAME})*"), "account": re.compile(_NAME)}

# Characters a path in a #SBATCH line cannot carry as itself: whitespace and quotes end or group the argument,
# '#' starts a comment, a backslash escapes (and in --output turns off %j), '%' is a --output pattern.
_UNSAFE_PATH_CHARS = re.compile(r"[\s\x00-\x1f\x7f'\"#%\\]")


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
        if not 0 <= self.grace_s <= MAX_GRACE_S:
            raise JobSpecError(f"--grace must be 0 to {MAX_GRACE_S} seconds (SLURM's --signal limit), "
                               f"got {self.grace_s}")
        if self.launcher not in LAUNCHERS:
            raise JobSpecError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        check_names(self.partition, "partition")
        check_names(self.account, "account")
        limit_s = time_limit_s(self.time)
        if limit_s is not None and limit_s <= self.grace_s:
            raise JobSpecError(f"--time {self.time} ({limit_s} s) is not longer than --grace {self.grace_s}: the "
                               "save request would come before any training; give a longer --time or a shorter "
                               "--grace")
        check_path(self.run_dir, "run.out_dir")
        check_path(self.workdir, "the working directory")

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


def _shown(value: str) -> str:
    """A user's value in a one-line message: quoted, escapes visible, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def time_limit_s(value: str | None) -> int | None:
    """Seconds of a `--time` in SLURM's syntax; None for no limit (none given, 0, INFINITE, UNLIMITED).
    Anything else SLURM would refuse, or read as more than one argument, is refused naming --time."""
    if value is None or value.lower() in _NO_LIMIT:
        return None
    match = _TIME.fullmatch(value)
    if match is None:
        raise JobSpecError(f"--time {_shown(value)} is not a SLURM time limit: use {_TIME_FORMS} (e.g. 90, "
                           "24:00:00, 2-00:00:00), or UNLIMITED")
    numbers = [int(g) for g in match.groups() if g is not None]
    if match.group(4) is not None:
        units = (86400, 3600, 60, 1)  # days-hours[:minutes[:seconds]]
    else:
        units = (3600, 60, 1) if len(numbers) == 3 else (60, 1)  # hours:minutes:seconds, minutes[:seconds]
    seconds = sum(n * unit for n, unit in zip(numbers, units))
    return seconds or None


def check_names(value: str | None, flag: str) -> None:
    """`--partition` (a comma-separated list) or `--account`: one #SBATCH argument of SLURM names."""
    if value is not None and not _NAMES[flag].fullmatch(value):
        listed = "a comma-separated list of names" if flag == "partition" else "a name"
        raise JobSpecError(f"--{flag} {_shown(value)} is not a SLURM {flag}: give {listed} of letters, digits, "
                           "'_', '.' and '-' (sinfo and sacctmgr show yours)")


def check_path(path: Path, what: str) -> None:
    """A folder written into a #SBATCH line (--chdir, --output) must read back as the same path."""
    bad = _UNSAFE_PATH_CHARS.search(str(path))
    if bad:
        raise JobSpecError(f"{what} {_shown(str(path))} contains {bad.group()!r}, which a #SBATCH line cannot "
                           "carry; choose a path without whitespace, quotes, '#', '%' or backslashes")


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
        f"DT_LAUNCHER={shlex.quote(spec.launcher)}",
        f"DT_PROCS_PER_NODE={spec.gpus_per_node:d}",
        f"DT_EXIT_PREEMPTED={EXIT_PREEMPTED:d}",
        f"DT_GRACE_S={spec.grace_s:d}",
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

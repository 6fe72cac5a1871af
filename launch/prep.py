"""Data preparation as a SLURM array: `python -m launch.slurm prep --tasks N --input ... --tokenizer ... --out OUT`.

Writes two batch scripts into OUT/slurm/ and submits them:
- `prep.sbatch`, an array job with one element per unfinished task: element I runs
  `python -m data_prep.shard ... --out OUT --num-tasks N` (its task id comes from `SLURM_ARRAY_TASK_ID`) on a
  node of its own (`--exclusive`: give it `--num-proc` = the node's cores), into OUT/tasks/I/;
- `merge.sbatch`: `python -m data_prep.merge OUT`, submitted with `--dependency=afterok:ARRAY` (it starts when
  every element succeeded; `--kill-on-invalid-dep=yes` cancels it when one failed or was cancelled).
A task is finished when OUT/tasks/I/manifest.json exists. Re-submitting the same command submits only the
unfinished tasks (an interrupted one resumes from its checkpoint) and the merge; with every task finished, only
the merge. `--nodes K` runs at most K tasks at once (`--array=...%K`). A finished task is not re-run even when the
command's settings changed: the merge then refuses it, naming the setting (use another OUT for other settings).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST_NAME = "manifest.json"
TASKS_DIR = "tasks"


@dataclass(frozen=True)
class PrepSpec:
    """One prep job: the shard command's options and the SLURM request."""

    out: Path
    tasks: int
    shard_args: tuple[str, ...]  # data_prep.shard options other than --out / --num-tasks / --task-id
    nodes: int | None = None  # at most this many tasks at once
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    python: str = sys.executable

    @property
    def slurm_dir(self) -> Path:
        return self.out / "slurm"

    def unfinished(self) -> list[int]:
        return [i for i in range(self.tasks) if not (self.out / TASKS_DIR / str(i) / MANIFEST_NAME).is_file()]


def array_ranges(ids: list[int]) -> str:
    """`--array` syntax for task ids: [0, 1, 2, 5] → "0-2,5"."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _directives(spec: PrepSpec, name: str, log: str) -> list[str]:
    lines = [f"#SBATCH --job-name={name}", "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --exclusive",
             f"#SBATCH --output={spec.slurm_dir / log}", "#SBATCH --open-mode=append"]
    for option, value in (("partition", spec.partition), ("account", spec.account), ("time", spec.time),
                          ("cpus-per-task", spec.cpus_per_task)):
        if value is not None:
            lines.append(f"#SBATCH --{option}={value}")
    return lines


def render(spec: PrepSpec, step: str) -> str:
    """The text of `prep.sbatch` (step "prep") or `merge.sbatch` (step "merge")."""
    if step == "prep":
        command = [spec.python, "-u", "-m", "data_prep.shard", *spec.shard_args, "--out", str(spec.out),
                   "--num-tasks", str(spec.tasks), "--no-progress"]
        head = _directives(spec, f"prep-{spec.out.name}", "prep-%A_%a.out")
        note = "# One element per task: data_prep.shard takes its task id from SLURM_ARRAY_TASK_ID."
    else:
        command = [spec.python, "-u", "-m", "data_prep.merge", str(spec.out)]
        head = _directives(spec, f"merge-{spec.out.name}", "merge-%j.out")
        note = "# Runs after every element of the prep array succeeded (--dependency=afterok)."
    return "\n".join(["#!/bin/bash", *head, note, f"cd {shlex.quote(str(REPO))} || exit 1",
                      "exec " + shlex.join(command), ""])


def write_scripts(spec: PrepSpec) -> dict[str, Path]:
    spec.slurm_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for step in ("prep", "merge"):
        path = spec.slurm_dir / f"{step}.sbatch"
        path.write_text(render(spec, step))
        path.chmod(0o755)
        paths[step] = path
    return paths


def array_option(spec: PrepSpec, ids: list[int]) -> str:
    return f"--array={array_ranges(ids)}" + (f"%{spec.nodes}" if spec.nodes else "")

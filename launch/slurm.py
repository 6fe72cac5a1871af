"""Train on a SLURM cluster: submit a run, see how it is doing, cancel it.

    python -m launch.slurm submit --config configs/X.yaml --nodes 4 --gpus-per-node 8 [key=value ...]
    python -m launch.slurm run    --config configs/X.yaml --nodes 1 --gpus-per-node 8   # no sbatch
    python -m launch.slurm status JOBID
    python -m launch.slurm cancel JOBID
    python -m launch.slurm prep   --tasks 64 --input corpus/ --tokenizer tok/ --out shards/ [--nodes 16]

`submit` validates the config and runs the trainer's preflight (data, vocabulary, batch size, resume state; the
per-GPU memory estimate is printed, and refused above `--gpu-memory`), writes `RUN_DIR/slurm/job.sbatch` (see
launch/sbatch.py) and hands it to `sbatch`; the job's output goes to `RUN_DIR/slurm/JOBID.out`. `run` writes the
same script and runs it in the foreground: inside an `salloc` allocation it uses that one, otherwise `srun`
allocates the nodes itself.
`prep` tokenizes a corpus as a SLURM array of `--tasks` tasks plus a merge job that runs after it (see
launch/prep.py); re-submitting it runs only the unfinished tasks.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dist_train.config import (
    Config,
    ConfigError,
    add_override_arguments,
    load_config,
    overrides_from,
    parse_args_with_overrides,
)
from dist_train.formats.atomic_file import current_umask
from launch.prep import PrepSpec, array_option, write_scripts
from launch.sbatch import LAUNCHERS, JobSpec, JobSpecError, check_names, check_path, render, time_limit_s


class SlurmError(RuntimeError):
    """SLURM is missing or refused a request; the message says what to do."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"`{name}` is not installed or not on PATH: run this on a SLURM login node "
                         "(or use `submit --dry-run` to only print the batch script)")
    return path


def _call(name: str, *args: str) -> str:
    """Run a SLURM client; its own error message becomes ours."""
    proc = subprocess.run([_tool(name), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise SlurmError(f"`{name} {' '.join(args)}` failed (exit {proc.returncode}): {detail}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------
# submit / run

def job_spec(args: argparse.Namespace) -> JobSpec:
    """Validate the config and what the trainer would check first (nothing is written or submitted for a bad
    one), then the job request."""
    config = Path(args.config)
    overrides = overrides_from(args)
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run.out_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.run.name or run_dir.name)
    spec = JobSpec(  # checks the job request (counts, launcher) before the preflight uses them
        config=config.resolve(), run_dir=run_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        overrides=tuple(overrides), launcher=args.launcher, cpu=args.cpu, partition=args.partition,
        account=args.account, time=args.time, cpus_per_task=args.cpus_per_task, grace_s=args.grace,
        job_name=f"dist_train-{name}",
    )
    peak_gib = cluster_preflight(cfg, args)
    if not args.cpu:
        print(f"preflight: data, vocabulary and batch size checked; estimated peak {peak_gib:.1f} GiB per GPU "
              f"(python -m dist_train.scaling memory for the breakdown)", file=sys.stderr)
    return spec


def cluster_preflight(cfg: Config, args: argparse.Namespace) -> float:
    """The trainer's own checks, on the submitting machine, so that a job does not wait in the queue to fail:
    data (exists, fits the vocabulary and seq_len, one tokenizer), batch size for this world size, and what the
    run folder holds (a finished run, a max_steps already passed, a config that breaks its checkpoint). Returns
    the estimated peak GiB per GPU; refuses one above --gpu-memory."""
    from dist_train.checkpoint.resume import check_before_launch
    from dist_train.scaling.memory import estimate_memory
    from dist_train.train.preflight import preflight

    if args.cpu and cfg.precision == "fp16":
        raise ConfigError("precision=fp16 needs CUDA GPUs, and --cpu asks for none: use precision=bf16 or fp32")
    preflight(cfg, args.nodes * args.gpus_per_node, this_machine=False)
    finished = check_before_launch(Path(cfg.run.out_dir), cfg, "latest", args.nodes * args.gpus_per_node)
    if finished:
        raise ConfigError(finished.replace("nothing to do, nothing changed", "nothing to submit"))
    est = estimate_memory(cfg, args.nodes * args.gpus_per_node)
    peak_gib = est.peak(cfg.model.grad_checkpointing) / 2**30
    if args.gpu_memory is not None and not args.cpu and peak_gib > args.gpu_memory:
        raise ConfigError(f"the run needs about {peak_gib:.1f} GiB per GPU (python -m dist_train.scaling memory "
                          f"--config {args.config} --gpus {args.nodes * args.gpus_per_node}), more than "
                          f"--gpu-memory {args.gpu_memory:g}: set model.grad_checkpointing=true, a higher "
                          f"deepspeed.zero_stage, a smaller train.micro_batch_size, or more GPUs")
    return peak_gib


def write_script(spec: JobSpec) -> Path:
    spec.script_path.parent.mkdir(parents=True, exist_ok=True)
    spec.script_path.write_text(render(spec))
    spec.script_path.chmod(0o777 & ~current_umask())  # executable, readable as far as the umask allows
    return spec.script_path


def submit(spec: JobSpec) -> dict[str, Any]:
    """Write the script and sbatch it; returns the job id and where its output goes."""
    _tool("sbatch")
    script = write_script(spec)
    out = _call("sbatch", "--parsable", str(script)).strip()
    job_id = out.split(";")[0]  # `--parsable` prints "ID" or "ID;CLUSTER"
    return {"job_id": job_id, "script": str(script), "log": str(spec.log_pattern).replace("%j", job_id),
            "run_dir": str(spec.run_dir)}


def run_here(spec: JobSpec) -> int:
    """Write the script and run it in the foreground, without sbatch."""
    _tool("srun")
    return subprocess.call(["bash", str(write_script(spec))])


def submit_prep(spec: PrepSpec, dry_run: bool = False) -> dict[str, Any]:
    """Write OUT/slurm/{prep,merge}.sbatch; submit the unfinished tasks as an array and the merge after it."""
    scripts = write_scripts(spec)
    todo = spec.unfinished()
    result: dict[str, Any] = {"out": str(spec.out), "tasks": spec.tasks, "submitted_tasks": todo,
                              "prep_script": str(scripts["prep"]), "merge_script": str(scripts["merge"])}
    prep_cmd = ["sbatch", "--parsable", array_option(spec, todo), str(scripts["prep"])] if todo else None
    merge_cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes", str(scripts["merge"])]
    if dry_run:
        after = [*merge_cmd[:2], "--dependency=afterok:ARRAY_JOB_ID", *merge_cmd[2:]] if prep_cmd else merge_cmd
        return {**result, "commands": [c for c in (prep_cmd, after) if c]}
    _tool("sbatch")
    array_id = None
    if prep_cmd:
        array_id = _call(*prep_cmd).strip().split(";")[0]
        merge_cmd.insert(2, f"--dependency=afterok:{array_id}")
    merge_id = _call(*merge_cmd).strip().split(";")[0]
    return {**result, "array_job_id": array_id, "merge_job_id": merge_id,
            "logs": str(spec.slurm_dir / "prep-%A_%a.out"), "merge_log": str(spec.slurm_dir / f"merge-{merge_id}.out")}


def prep_spec(args: argparse.Namespace) -> PrepSpec:
    if args.tasks < 1:
        raise JobSpecError(f"--tasks must be >= 1, not {args.tasks}")
    if args.nodes is not None and args.nodes < 1:
        raise JobSpecError(f"--nodes must be >= 1, not {args.nodes}")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise JobSpecError(f"--cpus-per-task must be >= 1, not {args.cpus_per_task}")
    # These go into the #SBATCH lines of both scripts, as in `submit`.
    check_names(args.partition, "partition")
    check_names(args.account, "account")
    time_limit_s(args.time)
    out = Path(args.out).resolve()
    check_path(out, "--out")
    shard_args = ["--input", *[str(Path(p).resolve()) for p in args.input],
                  "--tokenizer", str(Path(args.tokenizer).resolve())]
    for option in ("val_fraction", "seed", "num_proc", "text_field", "sample_by", "shard_tokens", "dtype"):
        value = getattr(args, option)
        if value is not None:
            shard_args += [f"--{option.replace('_', '-')}", str(value)]
    if args.streaming:
        shard_args.append("--streaming")
    return PrepSpec(out=out, tasks=args.tasks, shard_args=tuple(shard_args), nodes=args.nodes,
                    partition=args.partition, account=args.account, time=args.time,
                    cpus_per_task=args.cpus_per_task)


# ---------------------------------------------------------------------------------------------------------
# status / cancel

_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9/:_]*)=")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints `Key=value` pairs; a value may hold spaces or '=' (TRES=cpu=2,...)."""
    keys = list(_FIELD.finditer(line.strip()))
    fields: dict[str, str] = {}
    for this, nxt in zip(keys, keys[1:] + [None]):
        end = nxt.start() if nxt is not None else len(line.strip())
        fields[this.group(1)] = line.strip()[this.end():end].strip()
    return fields


def job_status(job_id: str) -> dict[str, Any]:
    try:
        out = _call("scontrol", "show", "job", "-o", job_id)
    except SlurmError as e:
        if "Invalid job id" in str(e):
            raise SlurmError(f"job {job_id} is not known to SLURM: a wrong id, or it ended more than "
                             "MinJobAge seconds ago (its log is in RUN_DIR/slurm/)") from None
        raise
    fields = parse_scontrol_line(out.splitlines()[0])
    return {
        "job_id": fields.get("JobId", job_id), "name": fields.get("JobName"), "state": fields.get("JobState"),
        "reason": fields.get("Reason"), "restarts": int(fields.get("Restarts", "0")),
        "nodes": fields.get("NodeList"), "run_time": fields.get("RunTime"),
        "time_limit": fields.get("TimeLimit"), "exit_code": fields.get("ExitCode"),
        "log": fields.get("StdOut"), "fields": fields,
    }


def cancel(job_id: str) -> dict[str, Any]:
    """USR2 to the batch script alone, a signal nothing but this command sends: the script asks the trainers to
    save (USR1, which the launchers ignore), waits up to the job's --grace, then cancels the job. TERM cannot
    mean "cancel": SLURM itself TERMs the batch script when it requeues, preempts or times out a job, and a
    plain `scancel` TERMs every process, so the deepspeed launcher would SIGKILL its trainers 30 s later and
    SLURM everything after KillWait, whatever the save still had to write. A job without a running batch
    script (pending, or `run` without sbatch) is cancelled plainly."""
    try:
        _call("scancel", "--batch", "--signal=USR2", job_id)
    except SlurmError:
        _call("scancel", job_id)
    return {"job_id": job_id, "cancel_requested": True}


# ---------------------------------------------------------------------------------------------------------
# command line

def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (YAML), validated before anything is written")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node = training processes per node (with --cpu: processes per node)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM, minutes); USR1 comes --grace seconds before")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per training process (data loader workers etc.)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="srun",
                   help="srun: one task per GPU, ranks from SLURM (default); "
                        "deepspeed: one task per node running the deepspeed launcher with --no_ssh, which "
                        "numbers each node's GPUs from 0: use it where SLURM confines a job to its GPUs "
                        "(ConstrainDevices=yes in cgroup.conf)")
    p.add_argument("--cpu", action="store_true", help="train on CPUs (gloo), ask for no GPUs")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="GiB per GPU of the cluster: refuse a run whose estimated peak needs more")
    p.add_argument("--grace", type=int, default=300, metavar="SECONDS",
                   help="seconds training gets to save a checkpoint: told this long before the time limit, and "
                        "waited for this long after `cancel` (default 300)")
    add_override_arguments(p)


def _add_prep_parser(sub) -> None:
    p = sub.add_parser("prep", help="tokenize a corpus as a SLURM array of tasks + a merge job after it")
    p.add_argument("--tasks", type=int, required=True, help="number of tasks (array elements, one node each)")
    p.add_argument("--nodes", type=int, help="run at most this many tasks at once (default: as SLURM allows)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="as data_prep.shard --input")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (data_prep.tokenizer --out)")
    p.add_argument("--out", required=True, help="shard folder; tasks write OUT/tasks/I/, the merge OUT/manifest.json")
    for option, kind in (("--val-fraction", float), ("--seed", int), ("--num-proc", int), ("--text-field", str),
                         ("--sample-by", str), ("--shard-tokens", int), ("--dtype", str)):
        p.add_argument(option, type=kind, help=f"as data_prep.shard {option} (default: its default)")
    p.add_argument("--streaming", action="store_true", help="as data_prep.shard --streaming")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--time", help="time limit per task")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (give --num-proc as many)")
    p.add_argument("--dry-run", action="store_true", help="write the scripts and print the sbatch commands; "
                                                          "submit nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="write RUN_DIR/slurm/job.sbatch and submit it with sbatch")
    _add_job_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("run", help="write the script and run it here with srun, without sbatch "
                                   "(inside salloc, or letting srun allocate)")
    _add_job_options(p)
    _add_prep_parser(sub)
    commands = {"status": "show a job's state, restarts and log",
                "cancel": "scancel a job; training saves a checkpoint, then stops"}
    for name, text in commands.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", metavar="JOBID")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _print(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


_JOB_ID = re.compile(r"\d+(?:[_+]\d+)?")  # a job, an array element (ID_I) or a heterogeneous component (ID+I)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("status", "cancel") and not _JOB_ID.fullmatch(args.job_id):
        # It becomes an scontrol/scancel argument: "--user=me" would cancel every job of that user.
        raise JobSpecError(f"JOBID {args.job_id!r:.60} is not a SLURM job id: give the number `submit` printed "
                           "(or ID_I for an array element)")
    if args.command == "status":
        s = job_status(args.job_id)
        _print(s, args.json, f"job {s['job_id']} ({s['name']}): {s['state']} (reason {s['reason']}), "
                             f"restarts {s['restarts']}, nodes {s['nodes']}, run time {s['run_time']} of "
                             f"{s['time_limit']}, exit code {s['exit_code']}\nlog: {s['log']}")
        return 0
    if args.command == "cancel":
        _print(cancel(args.job_id), args.json,
               f"cancel requested for job {args.job_id}: training saves a checkpoint, then stops")
        return 0
    if args.command == "prep":
        r = submit_prep(prep_spec(args), dry_run=args.dry_run)
        text = (f"tasks {r['submitted_tasks']} of {r['tasks']} to run; scripts in {Path(r['prep_script']).parent}"
                + ("".join(f"\n  {' '.join(c)}" for c in r["commands"]) if args.dry_run else
                   f"\n  array job {r['array_job_id']}, merge job {r['merge_job_id']} (after the array)"))
        _print(r, args.json, text)
        return 0
    spec = job_spec(args)
    if args.command == "run":
        return run_here(spec)
    if args.dry_run:
        _print({"script_path": str(spec.script_path), "script": render(spec)}, args.json, render(spec))
        return 0
    r = submit(spec)
    _print(r, args.json, f"submitted job {r['job_id']}\n  script: {r['script']}\n  log:    {r['log']}\n"
                         f"  status: python -m launch.slurm status {r['job_id']}\n"
                         f"  cancel: python -m launch.slurm cancel {r['job_id']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    try:
        return _dispatch(args)
    except (ConfigError, JobSpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

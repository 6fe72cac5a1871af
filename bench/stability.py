"""Training stability at high learning rates: where the tiny Llama's loss spikes or diverges, and whether q/k norms
plus z-loss (`model.qk_norm=true train.z_loss=1e-4`) keep it stable there and at twice that rate.

    python bench/stability.py [--lrs 1e-2,4e-2,...] [--seeds 1,2,3] [--steps 300] [--out runs/stability]
                              [--plot docs/stability_lr.png] [--json] [--dry-run]

Every run is `python launch/train.py --config configs/tiny.yaml` (one CPU process, one thread, fp32, ZeRO 1) on
the `make demo` shards, with --steps steps of 16 sequences of 128 tokens, a linear warmup of 20 steps to the
peak lr and then a *constant* lr: the rate under test is the rate of every step after the warmup (a cosine
decay would spend most of the run below it and hide the instability late in the run). The tiny config's grad
clipping (1.0) and weight decay stay; the spike rollback is off (train.max_rollbacks=0) so that spikes stay in
the loss, checkpoints and W&B are off, the loss is logged every step and the validation loss once, at the end.

1. The baseline (qk_norm off, z_loss 0) at each --lrs, lowest first, for each seed (train.seed: init and data
   order). The critical lr is the lowest lr at which a majority of the seeds are unstable; the sweep goes on
   only to twice it.
2. qk_norm + z_loss at the critical lr and at twice it, same seeds; the baseline at twice it too.

A run is unstable when (the definition is printed with the table):
  spike     the trainer's own detector (dist_train/train/spikes.py) with the trainer's defaults finds one:
            train.spike_steps (3) finite losses in a row, each more than train.spike_margin (1.0 nats) above
            the mean of the train.spike_window (20) normal losses before them;
  diverged  a non-finite loss (the trainer skips the step; train.max_bad_steps of them in a row stop it with
            exit code 3); or spike_steps (3) losses in a row more than spike_margin above the first step's
            (the untrained model's, ~ln 2048 = 7.6): worse than no training, which also catches a blow-up
            during the warmup, before the detector's window is full (1-2 such steps are a blip, as for the
            detector); or a last loss more than spike_margin above the lowest of the run (a loss that climbs
            slowly and stays up, which the rolling mean follows without flagging).
The table also gives the spikes the detector alone confirms (what train.max_rollbacks would act on), the highest
loss, and the "jump": the largest rise of a loss over the mean of the 20 losses before it (a blip of 1-2 steps
shows there without making a spike). A run folder under --out with a finished run is reused, so an interrupted bench
continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dist_train.config.schema import TrainConfig  # noqa: E402
from dist_train.monitor.jsonl import read_metrics  # noqa: E402
from dist_train.train.spikes import SpikeDetector  # noqa: E402
from dist_train.train.step import EXIT_DIVERGED  # noqa: E402
from bench.demo_data import DEMO_SHARDS, ensure_demo_data  # noqa: E402
from bench.ports import free_port  # noqa: E402

BASELINE, GUARDED = "baseline", "qk_norm+z_loss"
WARMUP_STEPS = 20
DEFAULTS = TrainConfig()  # the spike detector's window, margin and patience, as the trainer uses them
DEFINITION = (f"unstable = spike (dist_train/train/spikes.py: {DEFAULTS.spike_steps} finite losses in a row each "
              f"> {DEFAULTS.spike_margin} nats above the mean of the {DEFAULTS.spike_window} normal losses "
              f"before them) or diverged (a non-finite loss, {DEFAULTS.spike_steps} losses in a row > "
              f"{DEFAULTS.spike_margin} nats above the first step's, or the last loss > {DEFAULTS.spike_margin} "
              f"nats above the run's lowest); critical lr = the lowest lr at which a majority of the seeds are "
              f"unstable")


@dataclass
class Outcome:
    variant: str
    lr: float
    seed: int
    unstable: bool
    reason: str
    """The earliest sign of instability ("spike at step N", ...), or "" (stable)."""
    detector_spikes: int
    """Spikes the trainer's detector confirms over the whole run (what train.max_rollbacks would act on)."""
    max_loss: float
    """The highest finite training loss after the first step, nats."""
    max_jump: float
    """The largest loss minus the mean of the spike_window losses before it, nats."""
    final_loss: float
    """Mean training loss of the last 10 logged steps (nan when the run stopped on non-finite losses)."""
    val_loss: float | None
    """The validation loss at the end (None when the run stopped early)."""
    exit_code: int


def overrides(variant: str, lr: float, seed: int, steps: int, data: Path, run_dir: Path, z_loss: float) -> list[str]:
    guards = ["model.qk_norm=true", f"train.z_loss={z_loss}"] if variant == GUARDED else []
    return [f"data.path={data}", f"run.out_dir={run_dir}", f"train.seed={seed}", f"train.lr={lr}",
            "train.schedule=constant", f"train.warmup_steps={WARMUP_STEPS}", f"train.max_steps={steps}",
            "train.log_every=1", f"train.eval_every={steps}", "train.max_rollbacks=0", "checkpoint.every=0",
            "precision=fp32", "wandb.enabled=false", *guards]


def train(run_dir: Path, args: list[str], dry_run: bool) -> int | None:
    """The run's exit code: 0 done, 3 stopped on non-finite losses. A finished folder is reused; None on dry runs."""
    done = run_dir / "bench_exit_code"
    cmd = [sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", "--resume", "none", *args]
    if dry_run:
        print("python", *cmd[1:])
        return None
    if done.is_file():
        return int(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
    run_dir.mkdir(parents=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/dist_train/torch_extensions"))
    with (run_dir / "train.log").open("w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code not in (0, EXIT_DIVERGED):
        raise SystemExit(f"{run_dir.name} failed (exit {code}); see {run_dir / 'train.log'}")
    done.write_text(str(code))
    return code


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step; a non-finite loss (logged as null) is nan."""
    return [(r["step"], math.nan if r["loss"] is None else r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def max_jump(values: list[float], window: int) -> float:
    """The largest finite loss minus the mean of the `window` finite losses before it."""
    finite = [v for v in values if math.isfinite(v)]
    jumps = [finite[i] - statistics.fmean(finite[i - window:i]) for i in range(window, len(finite))]
    return max(jumps, default=math.nan)


def first_streak(curve: list[tuple[int, float]], threshold: float, length: int) -> int | None:
    """The first step of the first `length` losses in a row above `threshold`."""
    streak: list[int] = []
    for step, value in curve:
        streak = [*streak, step] if value > threshold else []
        if len(streak) == length:
            return streak[0]
    return None


def judge(variant: str, lr: float, seed: int, run_dir: Path, exit_code: int) -> Outcome:
    """Apply the definition of unstable (module docstring) to one finished run."""
    curve = losses(run_dir)
    values = [v for _, v in curve]
    margin = DEFAULTS.spike_margin
    detector = SpikeDetector(DEFAULTS.spike_window, margin, DEFAULTS.spike_steps)
    spikes = [s for s in (detector.observe(step, v) for step, v in curve) if s is not None]
    events = [(s.first_step, f"spike at step {s.first_step}") for s in spikes[:1]]
    events += [(step, f"non-finite loss at step {step}") for step, v in curve if not math.isfinite(v)][:1]
    above = first_streak(curve, values[0] + margin, DEFAULTS.spike_steps)
    if above is not None:
        events.append((above, f"above the first loss + {margin:g} from step {above}"))
    finite = [(step, v) for step, v in curve if math.isfinite(v)]
    if finite and finite[-1][1] > min(v for _, v in finite) + margin:
        events.append((finite[-1][0], f"climbed to {finite[-1][1]:.2f}"))
    reason = min(events)[1] if events else ""  # the earliest sign
    vals = [r["val_loss"] for r in read_metrics(run_dir) if r.get("val_loss") is not None]
    final = statistics.fmean(values[-10:]) if exit_code == 0 else math.nan
    peak = max((v for v in values[1:] if math.isfinite(v)), default=math.nan)
    return Outcome(variant, lr, seed, bool(reason), reason, len(spikes), peak, max_jump(values, DEFAULTS.spike_window),
                   final, vals[-1] if vals else None, exit_code)


def run_all(variant: str, lr: float, seeds: list[int], a: argparse.Namespace) -> list[Outcome]:
    """One run per seed of `variant` at `lr` (each judged as it finishes; empty on a dry run)."""
    out = []
    for seed in seeds:
        run_dir = a.out / f"{variant}_lr{lr:g}_s{seed}"
        started = time.perf_counter()
        code = train(run_dir, overrides(variant, lr, seed, a.steps, a.data, run_dir, a.z_loss), a.dry_run)
        if code is None:
            continue
        outcome = judge(variant, lr, seed, run_dir, code)
        out.append(outcome)
        print(f"  {run_dir.name}: {'UNSTABLE ' + outcome.reason if outcome.unstable else 'stable'}, "
              f"jump {outcome.max_jump:.2f}, final {outcome.final_loss:.3f} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
    return out


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout holds the results only (--json)


def majority_unstable(outcomes: list[Outcome]) -> bool:
    return sum(o.unstable for o in outcomes) * 2 > len(outcomes)


def sweep(a: argparse.Namespace) -> tuple[float | None, list[Outcome]]:
    """The baseline up the --lrs until a majority of the seeds are unstable; then both variants at 1x and 2x that lr.
    Returns (the critical lr or None, every outcome)."""
    outcomes: list[Outcome] = []
    critical = None
    for lr in sorted(a.lrs):
        if critical is not None and not math.isclose(lr, 2 * critical):
            break
        progress(f"{BASELINE} at lr {lr:g}")
        at_lr = run_all(BASELINE, lr, a.seeds, a)
        outcomes += at_lr
        if critical is None and (majority_unstable(at_lr) or a.dry_run and lr == sorted(a.lrs)[-1]):
            critical = lr
    if critical is None:
        return None, outcomes
    if not any(math.isclose(o.lr, 2 * critical) for o in outcomes):
        progress(f"{BASELINE} at lr {2 * critical:g}")
        outcomes += run_all(BASELINE, 2 * critical, a.seeds, a)
    for lr in (critical, 2 * critical):
        progress(f"{GUARDED} at lr {lr:g}")
        outcomes += run_all(GUARDED, lr, a.seeds, a)
    return critical, outcomes


def summary(outcomes: list[Outcome]) -> list[dict]:
    """Per (variant, lr): stable seeds, the mean final loss of the runs that finished, the highest loss and jump."""
    rows = []
    for key in dict.fromkeys((o.variant, o.lr) for o in outcomes):
        runs = [o for o in outcomes if (o.variant, o.lr) == key]
        finished = [o.final_loss for o in runs if math.isfinite(o.final_loss)]
        rows.append({"variant": key[0], "lr": key[1], "stable": sum(not o.unstable for o in runs), "seeds": len(runs),
                     "mean_final_loss": statistics.fmean(finished) if finished else None,
                     "max_loss": max(o.max_loss for o in runs), "max_jump": max(o.max_jump for o in runs)})
    return rows


def print_tables(critical: float | None, outcomes: list[Outcome], rows: list[dict]) -> None:
    print(f"\n{DEFINITION}\n")
    print("| lr | variant | seed | unstable | detector spikes | max loss | max jump | final loss | val loss |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for o in outcomes:
        val = "–" if o.val_loss is None else f"{o.val_loss:.3f}"
        final = "–" if math.isnan(o.final_loss) else f"{o.final_loss:.3f}"
        print(f"| {o.lr:g} | {o.variant} | {o.seed} | {o.reason or 'no'} | {o.detector_spikes} | {o.max_loss:.2f} | "
              f"{o.max_jump:.2f} | {final} | {val} |")
    print("\n| lr | variant | stable seeds | mean final loss | highest loss | largest jump |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        mean = "–" if r["mean_final_loss"] is None else f"{r['mean_final_loss']:.3f}"
        print(f"| {r['lr']:g} | {r['variant']} | {r['stable']}/{r['seeds']} | {mean} | {r['max_loss']:.2f} | "
              f"{r['max_jump']:.2f} |")
    print(f"\ncritical lr: {'none in the sweep' if critical is None else f'{critical:g}'}")


def plot(critical: float, a: argparse.Namespace, out: Path) -> None:
    """Loss curves, baseline (red) against qk_norm + z_loss (blue), at the critical lr and at twice it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, lr in zip(axes, (critical, 2 * critical)):
        for variant, colour in ((BASELINE, "tab:red"), (GUARDED, "tab:blue")):
            for i, seed in enumerate(a.seeds):
                curve = losses(a.out / f"{variant}_lr{lr:g}_s{seed}")
                ax.plot([s for s, _ in curve], [v for _, v in curve], styles[i % len(styles)], color=colour, lw=1.1,
                        label=f"{variant}, seed {seed}")
        first = losses(a.out / f"{BASELINE}_lr{lr:g}_s{a.seeds[0]}")[0][1]
        ax.axhline(first + DEFAULTS.spike_margin, color="black", ls=":", lw=1,
                   label=f"first loss + {DEFAULTS.spike_margin:g} nat: above it = diverged")
        ax.axvspan(0, WARMUP_STEPS, color="gray", alpha=0.12, label=f"warmup ({WARMUP_STEPS} steps)")
        ax.set_title(f"peak lr {lr:g} (constant after the warmup)")
        ax.set_xlabel("step")
        ax.set_yscale("log")  # a blow-up to hundreds of nats and the curves near 5 on one axes
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Tiny Llama (4 x 128, fp32, 1 CPU process): baseline vs qk_norm + z_loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=floats, default=floats("1e-2,4e-2,1.6e-1,3.2e-1,6.4e-1,1.28"),
                        help="peak learning rates of the baseline sweep, comma-separated (default: x4 steps up to "
                             "0.16, where the tiny model still trains, then x2 steps up to 1.28)")
    parser.add_argument("--seeds", type=ints, default=[1, 2, 3], help="train.seed values, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--z-loss", type=float, default=1e-4, help="train.z_loss of the guarded runs (PaLM's 1e-4)")
    parser.add_argument("--data", type=Path, default=DEMO_SHARDS,
                        help="a shard folder of a 2,048-token tokenizer (default: the `make demo` shards)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "stability", help="folder for the run folders")
    parser.add_argument("--plot", type=Path, help="write the loss curves at the critical lr and 2x to this PNG")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands of the sweep only "
                        "(as if the highest lr were critical); train nothing")
    return parser


def main() -> int:
    a = build_parser().parse_args()
    a.out, a.data = a.out.resolve(), a.data.resolve()
    if a.data == DEMO_SHARDS.resolve():
        ensure_demo_data()
    started = time.perf_counter()
    critical, outcomes = sweep(a)
    if a.dry_run:
        return 0
    rows = summary(outcomes)
    if a.json:
        print(json.dumps({"definition": DEFINITION, "critical_lr": critical, "steps": a.steps, "seeds": a.seeds,
                          "runs": [asdict(o) for o in outcomes], "summary": rows,
                          "wall_s": time.perf_counter() - started}))
    else:
        print_tables(critical, outcomes, rows)
        print(f"wall time {time.perf_counter() - started:.0f} s")
    if a.plot and critical is not None:
        plot(critical, a, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr if a.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fit L(N, D) = E + A/N^α + B/D^β to your own runs the way Hoffmann et al. 2022 did (appendix D.2):
minimise the sum over runs of Huber_δ(LSE(a - α log N, b - β log D, e) - log L) with δ = 1e-3 by L-BFGS,
from a grid of initialisations, with A, B, E = exp(a), exp(b), exp(e). The sum, not the mean, of the Huber
losses: Besiroglu et al. 2024 traced approach 3's premature stop to the mean's 400x smaller scale.

Runs come from a CSV (columns N, D, loss) or from run folders (summary.json: tokens and val_loss or
train_loss; config.yaml: the model, whose exact total parameter count is N, Chinchilla's convention).
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from dist_train.config import Config
from dist_train.scaling.laws import LossLaw

HUBER_DELTA = 1e-3

EXPONENT_RANGE = (0.0, 3.0)
"""α and β a fitted law may have: loss must fall with N and D (> 0), and not implausibly fast (published fits
give 0.28-0.37; Hoffmann et al.'s initialisation grid stops at 2)."""

MIN_DISTINCT = 3
"""Distinct model sizes N and distinct token counts D a fit of L(N, D) needs: with fewer, the terms of N or of
D cannot be told from E (two points fit any exponent)."""

# Hoffmann et al.'s initialisation grid: α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}.
PAPER_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
              "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}


@dataclass(frozen=True)
class Runs:
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    names: list[str]
    data: list[str] | None = None
    """Per run, the data it was trained on (folder and tokenizer); None for CSV rows, which do not say."""

    def __len__(self) -> int:
        return len(self.loss)


@dataclass(frozen=True)
class FitResult:
    law: LossLaw
    objective: float
    """Sum of Huber losses at the optimum."""
    starts: int
    """Initialisations L-BFGS ran from."""
    rmse_log: float
    """Root-mean-square error of log L over the runs."""
    r2_log: float
    """Coefficient of determination of log L (1 is a perfect fit; 0 no better than the mean loss)."""

    def goodness(self) -> str:
        return f"R² {self.r2_log:.4f} and RMSE {self.rmse_log:.4f} of log loss"


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """(..., 3, runs): the logs of the three terms A/N^α, B/D^β, E for parameter rows theta (..., 5)."""
    a, b, e, alpha, beta = np.moveaxis(theta, -1, 0)[..., None]
    return np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, np.broadcast_shapes(
        e.shape, log_n.shape))], axis=-2)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber(LSE(a - α log N, b - β log D, e) - log L) and its gradient in (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)  # a stable log-sum-exp, written out: this runs ~10^4 times
    x_n, x_d, x_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = x_n + x_d + x_e
    r = top + np.log(total) - log_l
    dhuber = np.clip(r, -delta, delta) / total  # Huber's derivative times d LSE / d term (softmax)
    grad = np.array([dhuber @ x_n, dhuber @ x_d, dhuber @ x_e, -(dhuber * x_n) @ log_n, -(dhuber * x_d) @ log_d])
    return float(_huber(r, delta).sum()), grad


def fit_loss_law(runs: Runs, delta: float = HUBER_DELTA, grid: dict[str, np.ndarray] | None = None,
                 starts: int | None = 50) -> FitResult:
    """Hoffmann et al.'s fit: L-BFGS from the grid's initialisations, keep the lowest objective.

    Every grid point is scored first (one vectorised pass) and L-BFGS runs from the `starts` best of them
    (None: from all, as the paper; 4,500 runs of L-BFGS take ~10 minutes on 2 cores, the best 50 give the
    same optimum on every data set the tests use)."""
    if len(runs) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 runs, got {len(runs)}")
    check_design(runs)
    grid = grid or PAPER_GRID
    log_n, log_d, log_l = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
    candidates = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    scores = _huber(logsumexp(_terms(candidates, log_n, log_d), axis=-2) - log_l, delta).sum(axis=-1)
    chosen = candidates[np.argsort(scores, kind="stable")[:starts]]
    best = None
    for start in chosen:
        res = minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True,
                       method="L-BFGS-B", options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    law = LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                  beta=float(beta))
    pred = np.log([law.loss(n, d) for n, d in zip(runs.params, runs.tokens)])
    spread = float(np.sum((log_l - log_l.mean()) ** 2))
    result = FitResult(law=law, objective=float(best.fun), starts=len(chosen),
                       rmse_log=float(np.sqrt(np.mean((pred - log_l) ** 2))),
                       r2_log=1.0 - float(np.sum((pred - log_l) ** 2)) / spread if spread > 0 else float("nan"))
    check_law(result, len(runs))
    return result


def _distinct(values: np.ndarray) -> list[float]:
    """Values that differ by more than 2 % (token counts are rounded to whole steps)."""
    out: list[float] = []
    for v in sorted(values):
        if not out or v > out[-1] * 1.02:
            out.append(float(v))
    return out


def check_design(runs: Runs) -> None:
    """Refuse runs that cannot determine the law: one data set, and enough distinct N and D."""
    if runs.data is not None and len(set(runs.data)) > 1:
        groups: dict[str, list[str]] = {}
        for name, data in zip(runs.names, runs.data):
            groups.setdefault(data, []).append(name)
        listing = "; ".join(f"{data}: {', '.join(names)}" for data, names in groups.items())
        raise ValueError(f"these runs were trained on different data or tokenizers, whose losses are not "
                         f"comparable: {listing}. Fit each group on its own (pass only its run folders)")
    for symbol, values, what in (("N", runs.params, "model sizes"), ("D", runs.tokens, "token counts")):
        distinct = _distinct(values)
        if len(distinct) < MIN_DISTINCT:
            shown = ", ".join(f"{v:.3g}" for v in distinct)
            raise ValueError(f"degenerate design: the {len(runs)} runs have {len(distinct)} distinct {what} {symbol} "
                             f"({shown}), and a fit of L(N, D) needs at least {MIN_DISTINCT} distinct N and "
                             f"{MIN_DISTINCT} distinct D. Add runs, e.g. an IsoFLOP design: 3 or more model sizes at "
                             f"each of 2 or more budgets (bench/scaling_sweep.py)")


def check_law(result: FitResult, runs: int) -> None:
    """Refuse a law whose parameters are out of range, not finite, or whose optimum is not a real number."""
    law, (low, high) = result.law, EXPONENT_RANGE
    values = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta}
    problems = [f"{k} = {v!r} is not finite" for k, v in values.items() if not np.isfinite(v)]
    problems += [f"{k} = {v:.4g} is outside ({low:g}, {high:g}]" for k, v in (("α", law.alpha), ("β", law.beta))
                 if np.isfinite(v) and not low < v <= high]
    if not problems:
        g = law.optimal_law("fit", "").g
        if isinstance(g, complex) or not np.isfinite(g) or g <= 0:
            problems.append(f"the compute-optimal N is not a positive real number (G = {g})")
    if problems:
        raise ValueError(f"the fit is refused: {'; '.join(problems)} (L = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.4g}"
                         f" + {law.B:.4g}/D^{law.beta:.4g}; {result.goodness()} over {runs} runs). An exponent <= 0 "
                         f"means the loss does not fall as N or D grows in these runs: look for a run that diverged "
                         f"or trained with another recipe; otherwise add runs over a wider range of N and D")


# ---------------------------------------------------------------------------------------------------------
# Reading runs

def _read_csv(path: Path) -> list[tuple[float, float, float, str]]:
    aliases = {"n": "n", "params": "n", "parameters": "n", "d": "d", "tokens": "d", "loss": "loss",
               "val_loss": "loss"}
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = {aliases[c.strip().lower()]: c for c in reader.fieldnames or [] if c.strip().lower() in aliases}
        if set(columns) != {"n", "d", "loss"}:
            raise ValueError(f"{path}: needs columns N, D and loss (also accepted: params, tokens, val_loss); "
                             f"found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            try:
                rows.append((float(row[columns["n"]]), float(row[columns["d"]]), float(row[columns["loss"]]),
                             f"{path.name}:{i}"))
            except ValueError:
                raise ValueError(f"{path}, line {i}: N, D and loss must be numbers, got {row}") from None
    return rows


def _data_label(cfg: Config) -> str:
    """The data a run trained on, as a label: its folders and the tokenizer that made them (a hash of the
    tokenizer's files where the manifest records it), so runs on other data or tokenizers can be told apart."""
    from dist_train.formats.manifest import read_manifest

    parts = []
    for path, weight in cfg.data.weighted_paths():
        try:
            manifest = read_manifest(path)
            tokenizer = manifest.get("prep", {}).get("tokenizer_sha256", "")[:12] or manifest.get("tokenizer")
            parts.append(f"{path} (tokenizer {tokenizer}, vocab {manifest['vocab_size']})")
        except (OSError, ValueError):
            parts.append(str(path))
        if len(cfg.data.weighted_paths()) > 1:
            parts[-1] += f" x{weight:g}"
    return " + ".join(parts)


def _read_run(folder: Path) -> tuple[float, float, float, str, str]:
    from dist_train.config import load_config
    from dist_train.model.count import count_params

    summary = json.loads((folder / "summary.json").read_text())
    loss = summary.get("val_loss") if summary.get("val_loss") is not None else summary.get("train_loss")
    if loss is None or not summary.get("tokens"):
        raise ValueError(f"{folder}/summary.json has no val_loss/train_loss or tokens")
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"{folder}: no config.yaml next to summary.json, so N is unknown")
    cfg = load_config(folder / "config.yaml")
    return (float(count_params(cfg.model).total), float(summary["tokens"]), float(loss), folder.name,
            _data_label(cfg))


def load_runs(paths: list[str | Path]) -> Runs:
    """Runs from CSV files, run folders, or folders holding run folders (any depth)."""
    rows: list[tuple[float, float, float, str, str | None]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            rows += [(*row, None) for row in _read_csv(path)]
        elif (path / "summary.json").is_file():
            rows.append(_read_run(path))
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("summary.json"))
            if not found:
                raise ValueError(f"{path}: no summary.json below it (is the run finished?)")
            rows += [_read_run(p) for p in found]
        else:
            raise ValueError(f"{path} does not exist: pass a CSV of N, D, loss or run folders")
    if any(n <= 0 or d <= 0 or loss <= 0 for n, d, loss, _, _ in rows):
        raise ValueError("N, D and loss must all be positive")
    n, d, loss, names, data = zip(*rows) if rows else ((), (), (), (), ())
    known = [x for x in data if x is not None]
    return Runs(np.array(n, dtype=float), np.array(d, dtype=float), np.array(loss, dtype=float), list(names),
                [x or "a CSV (data not recorded)" for x in data] if known else None)


# ---------------------------------------------------------------------------------------------------------
# Report and figure

def compute_budgets(runs: Runs, decades: float = 0.15) -> list[tuple[float, np.ndarray]]:
    """Runs grouped by training budget C = 6ND: runs within `decades` of each other in log10 C share a
    budget (token counts are rounded to whole steps, so an IsoFLOP group is never exactly equal)."""
    log_c = np.log10(6.0 * runs.params * runs.tokens)
    order = np.argsort(log_c)
    groups: list[list[int]] = []
    for i in order:
        if groups and log_c[i] - log_c[groups[-1][0]] <= decades:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [(float(10 ** np.mean(log_c[g])), np.array(g)) for g in groups]


def fit_report(runs: Runs, result: FitResult, extra_budgets: list[float] = ()) -> dict[str, object]:
    law = result.law
    optimal = law.optimal_law("fit", "your runs")
    budgets = sorted({c for c, _ in compute_budgets(runs)} | set(extra_budgets))
    return {"runs": len(runs), "law": {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta},
            "objective": result.objective, "rmse_log_loss": result.rmse_log, "r2_log_loss": result.r2_log,
            "starts": result.starts,
            "a": optimal.a, "b": optimal.b, "G": optimal.g,
            "allocations": [optimal.allocation(c) for c in budgets]}


def plot_fit(runs: Runs, result: FitResult, path: str | Path) -> Path:
    """IsoFLOP-style figure: loss against N per budget with the fitted law's slice through it and its
    optimum (left); the compute-optimal N against C of the fit beside the published laws (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dist_train.scaling.laws import LAWS

    law, optimal = result.law, result.law.optimal_law("fit", "your runs")
    budgets = compute_budgets(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(budgets)))
    for (c, idx), color in zip(budgets, colors):
        n_lo, n_hi = runs.params[idx].min() / 3, runs.params[idx].max() * 3
        ns = np.logspace(np.log10(n_lo), np.log10(n_hi), 200)
        left.plot(ns, [law.loss(n, c / (6 * n)) for n in ns], color=color, lw=1.5)
        left.scatter(runs.params[idx], runs.loss[idx], color=color, s=36, zorder=3, label=f"C = {c:.2g} FLOPs")
        n_opt = optimal.params_for_compute(c)
        left.scatter([n_opt], [law.loss(n_opt, c / (6 * n_opt))], marker="*", s=180, color=color,
                     edgecolor="black", zorder=4)
    left.set(xscale="log", xlabel="parameters N", ylabel="loss (nats/token)",
             title=f"L = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    left.legend(fontsize=8)
    c_all = 6.0 * runs.params * runs.tokens
    cs = np.logspace(np.log10(c_all.min()) - 1, np.log10(c_all.max()) + 2, 100)
    right.plot(cs, optimal.params_for_compute(cs), color="black", lw=2, label=f"your fit (a = {optimal.a:.2f})")
    for name, published in LAWS.items():
        right.plot(cs, published.params_for_compute(cs), ls="--", lw=1, label=f"{name} (a = {published.a:.2f})")
    right.scatter(c_all, runs.params, color="gray", s=16, label="your runs")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="compute-optimal N",
              title="compute-optimal model size")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

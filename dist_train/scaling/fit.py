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

from dist_train.scaling.laws import LossLaw

HUBER_DELTA = 1e-3

# Hoffmann et al.'s initialisation grid: α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}.
PAPER_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
              "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0)}


@dataclass(frozen=True)
class Runs:
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    names: list[str]

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
    return FitResult(law=law, objective=float(best.fun), starts=len(chosen),
                     rmse_log=float(np.sqrt(np.mean((pred - log_l) ** 2))))


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


def _read_run(folder: Path) -> tuple[float, float, float, str]:
    from dist_train.config import load_config
    from dist_train.model.count import count_params

    summary = json.loads((folder / "summary.json").read_text())
    loss = summary.get("val_loss") if summary.get("val_loss") is not None else summary.get("train_loss")
    if loss is None or not summary.get("tokens"):
        raise ValueError(f"{folder}/summary.json has no val_loss/train_loss or tokens")
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"{folder}: no config.yaml next to summary.json, so N is unknown")
    cfg = load_config(folder / "config.yaml")
    return float(count_params(cfg.model).total), float(summary["tokens"]), float(loss), folder.name


def load_runs(paths: list[str | Path]) -> Runs:
    """Runs from CSV files, run folders, or folders holding run folders (any depth)."""
    rows: list[tuple[float, float, float, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            rows += _read_csv(path)
        elif (path / "summary.json").is_file():
            rows.append(_read_run(path))
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("summary.json"))
            if not found:
                raise ValueError(f"{path}: no summary.json below it (is the run finished?)")
            rows += [_read_run(p) for p in found]
        else:
            raise ValueError(f"{path} does not exist: pass a CSV of N, D, loss or run folders")
    if any(n <= 0 or d <= 0 or loss <= 0 for n, d, loss, _ in rows):
        raise ValueError("N, D and loss must all be positive")
    n, d, loss, names = zip(*rows) if rows else ((), (), (), ())
    return Runs(np.array(n, dtype=float), np.array(d, dtype=float), np.array(loss, dtype=float), list(names))


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
            "objective": result.objective, "rmse_log_loss": result.rmse_log, "starts": result.starts,
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

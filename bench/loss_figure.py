"""The training-loss figure of the bench scripts that compare runs: one axes over steps, written as a PNG.

    with loss_figure(png, "title") as ax:
        ax.plot(steps, losses, label=...)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

@contextmanager
def loss_figure(out: Path, title: str, height: float = 4.5, legend_size: int = 8) -> Iterator[Any]:
    """Yield the axes to draw the runs on; on exit label, legend and save it to `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, height))
    yield ax
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

"""loss.png for backprop train --out: the smoothed training loss and the periodic validation loss
against steps, drawn by matplotlib (an optional dependency: pip install 'backprop[plot]')."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import torch

MISSING = "loss.png needs matplotlib, which is not installed (pip install 'backprop[plot]')"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def loss_curve(path: Path | BinaryIO, losses: list[float], val_losses: list[tuple[int, float]],
               title: str) -> None:
    """Every step's batch loss (faint), its mean over windows of 1% of the run, and the
    validation loss, on a log y-axis."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import FormatStrFormatter

    losses = [x if math.isfinite(x) else math.nan for x in losses]  # a diverged run: gaps, not inf
    window = max(1, len(losses) // 100)
    means = torch.tensor(losses[:len(losses) // window * window]).view(-1, window).mean(1)
    centres = (torch.arange(len(means)) * window + (window + 1) / 2).tolist()
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, color="C0", alpha=0.15, linewidth=0.5)
    ax.plot(centres, means.tolist(), color="C0", label=f"train (batch loss, mean of {window} steps)")
    if val_losses:
        steps, values = zip(*val_losses)
        ax.plot(steps, values, "o-", color="C1", markersize=3,
                label="val (BatchNorm calibrated on the training set)")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 2.5, not 2.5x10^0
        axis(FormatStrFormatter("%.1f"))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100, format="png")

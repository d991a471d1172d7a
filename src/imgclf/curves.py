"""Training curves (loss and validation scores per epoch) as a PNG: drawn by train after every
epoch (RUN_DIR/curves.png) and by evaluate for its report, with the same code (core layer).

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no GUI backend and no
global figure list, so nothing leaks across many calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100


@contextlib.contextmanager
def literal_text() -> Iterator[None]:
    """Every Text made inside (tick labels are made when the figure is drawn, so wrap the save too)
    shows its string as written. Labels are data, not markup: matplotlib would parse a class named
    `$\\frac{$` as mathtext (and raise), and with usetex hand it to LaTeX. Also a decorator."""
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        yield


def save_figure(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


@literal_text()
def training_curves(history: pd.DataFrame, path: Path, baseline_f1: float | None = None) -> Path | None:
    """Loss and validation scores per epoch from the run's metrics.csv; None when it has neither."""
    losses = [c for c in ("train_loss", "val_loss") if c in history]
    scores = [c for c in ("val_accuracy", "val_f1_macro") if c in history]
    if "epoch" not in history or not (losses or scores) or history.empty:
        return None
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_score = fig.subplots(1, 2)
    for col in losses:
        ax_loss.plot(history["epoch"], history[col], marker="o", label=col)
    ax_loss.set_title("loss")
    for col in scores:
        ax_score.plot(history["epoch"], history[col], marker="o", label=col)
    if baseline_f1 is not None:
        ax_score.axhline(baseline_f1, color="#c0392b", linestyle="--", label="weighted-random F1-macro")
    ax_score.set_ylim(0, 1.02)
    ax_score.set_title("validation")
    for ax in (ax_loss, ax_score):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return save_figure(fig, path)

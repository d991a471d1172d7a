"""Evaluation plots as PNG files (matplotlib, no display needed).

Training curves are drawn by `imgclf.curves` (shared with train). Figures are built with
`matplotlib.figure.Figure` directly rather than pyplot, so nothing
depends on a GUI backend or on pyplot's global figure list (no leaks across many calls).
Sizes, fonts and label rotation grow with the number of classes so that a 50+ class
confusion matrix still has one readable label per row. Class names are data: every figure is
drawn inside `curves.literal_text`, so `$...$` in a name is shown as written, never parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from imgclf.curves import literal_text, save_figure

MAX_LABEL = 28  # characters; longer class names are cut with an ellipsis


@dataclass(frozen=True)
class Layout:
    """How a per-class figure adapts to K classes."""

    side: float  # inches
    tick_fontsize: float
    rotation: int
    annotate: bool  # write the number in each confusion-matrix cell
    cell_fontsize: float


def layout_for(k: int) -> Layout:
    side = float(np.clip(0.32 * k + 3.5, 6.0, 45.0))
    # A tick label takes about a third of its cell's height (in points), within 6..10 pt.
    tick = float(np.clip(side / k * 72 * 0.33, 6, 10))
    return Layout(side=side, tick_fontsize=tick, rotation=45 if k <= 12 else 90,
                  annotate=k <= 25, cell_fontsize=float(np.clip(14 - k / 2.5, 5, 10)))


def short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


@literal_text()
def confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path, normalize: bool) -> Path:
    """Counts, or rows normalised to recall (a row with no images stays 0)."""
    k = len(class_names)
    lay = layout_for(k)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    else:
        values = cm
    fig = Figure(figsize=(lay.side + 1.2, lay.side))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(int(values.max()), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    labels = [short(n) for n in class_names]
    ax.set_xticks(range(k), labels, rotation=lay.rotation, ha="right" if lay.rotation == 45 else "center",
                  fontsize=lay.tick_fontsize)
    ax.set_yticks(range(k), labels, fontsize=lay.tick_fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kind = "row-normalised (recall on the diagonal)" if normalize else "counts"
    ax.set_title(f"confusion matrix, {kind}")
    if lay.annotate:
        threshold = values.max() / 2 if values.max() > 0 else 1
        for i, j in np.ndindex(values.shape):
            if cm[i, j] == 0:
                continue
            text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=lay.cell_fontsize,
                    color="white" if values[i, j] > threshold else "black")
    return save_figure(fig, path)


@literal_text()
def per_class_f1(table: pd.DataFrame, path: Path, baseline_f1: float | None = None) -> Path:
    """Horizontal bars of F1 per class, worst at the top; `table` has columns class, f1, support."""
    table = table.sort_values("f1", ascending=False)
    k = len(table)
    lay = layout_for(k)
    fig = Figure(figsize=(8, max(3.0, 0.28 * k + 1.5)))
    ax = fig.add_subplot()
    ax.barh(range(k), table["f1"], color="#3b7dd8")
    labels = [f"{short(c)} (n={s})" for c, s in zip(table["class"], table["support"], strict=True)]
    ax.set_yticks(range(k), labels, fontsize=lay.tick_fontsize)
    if baseline_f1 is not None:
        ax.axvline(baseline_f1, color="#c0392b", linestyle="--", label="weighted-random F1-macro")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title("F1 per class")
    return save_figure(fig, path)


@literal_text()
def most_confused(pairs: list[tuple[str, str, int]], path: Path) -> Path:
    """Bars for (true, predicted, count), largest at the top."""
    fig = Figure(figsize=(8, max(2.5, 0.35 * len(pairs) + 1.2)))
    ax = fig.add_subplot()
    if pairs:
        counts = [c for _, _, c in pairs]
        ax.barh(range(len(pairs)), counts[::-1], color="#e67e22")
        ax.set_yticks(range(len(pairs)), [f"{short(t)} → {short(p)}" for t, p, _ in pairs[::-1]], fontsize=9)
        ax.set_xlabel("images (true → predicted)")
    else:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("most confused pairs")
    return save_figure(fig, path)

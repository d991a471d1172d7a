"""Lightning callbacks of `train`: RUN_DIR/metrics.csv and RUN_DIR/curves.png, one row per epoch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd

from imgclf._lightning import ImageClassifier

METRICS_NAME = "metrics.csv"
CURVES_NAME = "curves.png"
METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_f1_macro", "lr",
                  "epoch_seconds", "images_per_s"]


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return pd.DataFrame(columns=METRIC_COLUMNS)
    return pd.read_csv(path)


class MetricsLog(pl.Callback):
    """Appends an epoch's row after validation; a resumed run drops rows of epochs it redoes."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, ImageClassifier)
        train_stats = pl_module.finish_train_stats()  # every rank: the loss mean is synced
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        row: dict[str, Any] = {"epoch": epoch, **train_stats}
        for key in ("val_loss", "val_accuracy", "val_f1_macro"):
            row[key] = pl_module.val_stats.get(key, math.nan)
        frame = read_metrics(self.run_dir)
        frame = frame[frame["epoch"] < epoch]
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)[METRIC_COLUMNS]
        frame.to_csv(self.run_dir / METRICS_NAME, index=False)
        plot_curves(frame, self.run_dir / CURVES_NAME)


def plot_curves(frame: pd.DataFrame, path: Path) -> None:
    """Loss (train, val) and validation accuracy / F1-macro per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(frame["epoch"], frame["train_loss"], marker="o", label="train loss")
    ax_loss.plot(frame["epoch"], frame["val_loss"], marker="o", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_score.plot(frame["epoch"], frame["val_accuracy"], marker="o", label="val accuracy")
    ax_score.plot(frame["epoch"], frame["val_f1_macro"], marker="o", label="val F1-macro")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylim(0, 1)
    ax_score.set_title("validation")
    ax_score.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)

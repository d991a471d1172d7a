"""Lightning callbacks of `train`: RUN_DIR/metrics.csv and RUN_DIR/curves.png, one row per epoch, and
the guard that stops a run whose stored images turned out unreadable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd

from imgclf import data
from imgclf._files import atomic_path
from imgclf.curves import training_curves
from imgclf.rundir import CURVES, METRICS_CSV
from imgclf.train._module import ImageClassifier

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_f1_macro", "lr",
                  "epoch_seconds", "images_per_s"]


def read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / METRICS_CSV
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
        frame.to_csv(self.run_dir / METRICS_CSV, index=False)
        plot_curves(frame, self.run_dir / CURVES)


def plot_curves(frame: pd.DataFrame, path: Path) -> None:
    """curves.png after every epoch, drawn by the same code as evaluate's training curves.

    Written atomically, so a run killed mid-save keeps the previous plot.
    """
    if frame.empty:
        return
    with atomic_path(path) as tmp:
        training_curves(frame, tmp)


class UnreadableGuard(pl.Callback):
    """Stops a run with one line (DataError) once the share of unreadable stored images passes
    data.max_unreadable. Without the RAM cache images are read batch by batch, so the count grows
    as training goes; the datasets' shared flags hold what the loader workers found."""

    def __init__(self, max_share: float) -> None:
        self.max_share = max_share
        self.datasets: list[data.DecodedImages] = []

    @property
    def unreadable(self) -> int:
        return sum(d.failures.count() for d in self.datasets)

    def check(self) -> int:
        return data.check_unreadable(self.datasets, self.max_share)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.check()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check()

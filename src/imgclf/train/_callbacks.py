"""Lightning callbacks of `train`: RUN_DIR/metrics.csv and RUN_DIR/curves.png, one row per epoch, and
the guard that stops a run whose stored images turned out unreadable."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd

from imgclf import data
from imgclf._files import atomic_path
from imgclf.csvfile import write_frame
from imgclf.curves import training_curves
from imgclf.rundir import CURVES, METRICS_CSV
from imgclf.train._module import ImageClassifier

log = logging.getLogger("imgclf.train")
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
        columns = METRIC_COLUMNS
        if pl_module.multilabel:  # one more column, after the single-label ones (task: multilabel)
            row["val_map"] = pl_module.val_stats.get("val_map", math.nan)
            columns = [*METRIC_COLUMNS, "val_map"]
        frame = read_metrics(self.run_dir)
        frame = frame[frame["epoch"] < epoch]
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)[columns]
        write_frame(frame, self.run_dir / METRICS_CSV, index=False)
        plot_curves(frame, self.run_dir / CURVES)
        log.info(epoch_line(row, trainer.max_epochs))


def epoch_line(row: dict[str, Any], max_epochs: int | None) -> str:
    """One readable line per epoch, printed with or without a progress bar (logs, CI, notebooks)."""
    of = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    return (f"epoch {int(row['epoch']) + 1}{of}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
            f"val accuracy {row['val_accuracy']:.4f}, val F1-macro {row['val_f1_macro']:.4f}, lr {row['lr']:.3g}, "
            f"{row['epoch_seconds']:.1f}s, {row['images_per_s']:.0f} images/s"
            + (f", val mAP {row['val_map']:.4f}" if "val_map" in row else ""))


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

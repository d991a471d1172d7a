"""The run directory contract: every file a run holds, and the typed record in run.json.

This is to RUN_DIR what `manifest.py` is to DATA_DIR: train writes these files, evaluate,
predict, export, serve, the demo and the CLI read them, and all of them spell the names here.

    config.yaml              the resolved TrainConfig (defaults + file + overrides)
    split.csv                row, path, label, subset (train/val): the seeded stratified split
    run.json                 RunInfo below: status, data_dir, class names, best score, ...
    checkpoints/best.ckpt    best by trainer.monitor      checkpoints/last.ckpt   to resume
    metrics.csv              one row per epoch (train loss, val loss/accuracy/F1, lr, time, images/s)
    curves.png               loss and validation curves, redrawn after every epoch
    lr_find.png, lr_find.json  the learning-rate finder's curve and suggestion (train --lr-find)
    evaluate writes metrics.json, predictions.csv, classification_report.csv, report.html and
    its PNGs here too (see docs/evaluate.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from imgclf._files import write_atomic
from imgclf.errors import DataError

CONFIG = "config.yaml"
SPLIT = "split.csv"
RUN_INFO = "run.json"
CHECKPOINTS = "checkpoints"
BEST = f"{CHECKPOINTS}/best.ckpt"
LAST = f"{CHECKPOINTS}/last.ckpt"
METRICS_CSV = "metrics.csv"
CURVES = "curves.png"
LR_FIND_PNG = "lr_find.png"
LR_FIND_JSON = "lr_find.json"
TENSORBOARD = "tensorboard"
MLFLOW = "mlruns"

RunStatus = Literal["training", "done", "interrupted", "failed"]


class RunInfo(BaseModel):
    """run.json. Unknown keys of a newer imgclf are kept when read (extra="allow")."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    status: RunStatus
    data_dir: str
    class_names: list[str]
    arch: str
    seed: int
    imgclf_version: str
    torch_version: str
    world_size: int = 1
    best_checkpoint: str = BEST
    last_checkpoint: str = LAST
    best_score: float | None = None
    monitor: str | None = None
    epochs_run: int | None = None
    collapsed_epochs: list[int] = []
    unreadable_images: int = 0
    last_seconds: float | None = None


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory; `RunDir(path).best` etc."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def split(self) -> Path:
        return self.path / SPLIT

    @property
    def info_path(self) -> Path:
        return self.path / RUN_INFO

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_CSV

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    def read_info(self) -> RunInfo | None:
        """run.json, or None when the run has none (an unreadable one is a DataError)."""
        if not self.info_path.is_file():
            return None
        try:
            return RunInfo.model_validate(json.loads(self.info_path.read_text()))
        except (OSError, ValueError, ValidationError) as err:
            raise DataError(f"{self.info_path}: unreadable run.json ({err.__class__.__name__})") from None

    def write_info(self, info: RunInfo) -> Path:
        # json.dumps, not model_dump_json: a data_dir whose name is not UTF-8 (surrogate escapes)
        # is written as JSON escapes and reads back the same, instead of failing after training.
        return write_atomic(self.info_path, json.dumps(info.model_dump(mode="python"), indent=2) + "\n")


MODEL_KINDS = "a run directory, a checkpoint (.ckpt/.pt), or a file written by `imgclf export` (.onnx, TorchScript)"


def require_model(path: Path) -> Path:
    """`path` when it exists; else the one-line error every command gives for a mistyped MODEL.

    Checked first, so `evaluate runs/typo` names the typo instead of asking for --data.
    """
    if not Path(path).exists():
        raise DataError(f"{path}: no such model ({MODEL_KINDS})")
    return Path(path)

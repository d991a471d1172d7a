"""Datasets built from the download manifest, and the seeded stratified train/val split.

The split is written to `RUN_DIR/split.csv` (columns row, path, label, subset), so that
evaluation and resumed runs use exactly the same images.

Split rule per class with n images in the training pool: n_val = round(n * val_fraction),
at least 1 when n >= 2, and never all of them. A class with a single image stays in train
(and a warning names it): it cannot be validated, but dropping it would hide it from the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from imgclf.errors import DataError
from imgclf.images import open_image_file
from imgclf.manifest import read_manifest, usable_rows

log = logging.getLogger(__name__)
SPLIT_NAME = "split.csv"


def stratified_split(labels: pd.Series, val_fraction: float, seed: int) -> np.ndarray:
    """Return a boolean array: True where the row goes to validation."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label, idx in sorted(labels.groupby(labels).indices.items()):
        n = len(idx)
        if n < 2:
            log.warning("class %r has %d image(s): kept in train only, not validated", label, n)
            continue
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def make_split(data_dir: str | Path, val_fraction: float, seed: int) -> pd.DataFrame:
    """Train pool = manifest rows with status ok and split train (val rows, if given, are used as val)."""
    manifest = read_manifest(data_dir)
    ok = usable_rows(manifest)
    pool = ok[ok["split"] == "train"].reset_index(drop=True)
    given_val = ok[ok["split"] == "val"].reset_index(drop=True)
    if pool.empty:
        raise DataError(f"{data_dir}: no downloaded images with split 'train' in the manifest")
    if given_val.empty:
        subset = np.where(stratified_split(pool["label"], val_fraction, seed), "val", "train")
        frame = pool.assign(subset=subset)
    else:
        frame = pd.concat([pool.assign(subset="train"), given_val.assign(subset="val")], ignore_index=True)
    return frame[["row", "path", "label", "subset"]]


def class_names_of(split: pd.DataFrame) -> list[str]:
    names = sorted(split["label"].unique().tolist())
    if len(names) < 2:
        raise DataError(f"need at least 2 classes to train, found {len(names)}: {names}")
    return names


def load_or_make_split(run_dir: Path, data_dir: str | Path, val_fraction: float, seed: int) -> pd.DataFrame:
    path = run_dir / SPLIT_NAME
    if path.is_file():
        return pd.read_csv(path, dtype={"path": str, "label": str, "subset": str}, keep_default_na=False)
    split = make_split(data_dir, val_fraction, seed)
    split.to_csv(path, index=False)
    return split


class ImageFolderFrame(Dataset):
    """(image tensor, class index) for each row of a frame with `path` and `label` columns."""

    def __init__(self, frame: pd.DataFrame, data_dir: str | Path, class_names: list[str],
                 transform: Callable) -> None:
        self.data_dir = Path(data_dir)
        self.paths = frame["path"].tolist()
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise DataError(f"labels not known to the model: {', '.join(map(str, unknown[:5]))}")
        self.targets = torch.tensor([index[label] for label in frame["label"]], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = open_image_file(str(self.data_dir / self.paths[i]))
        return self.transform(image), self.targets[i]

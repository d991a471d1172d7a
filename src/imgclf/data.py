"""Datasets built from the download manifest, and the seeded stratified train/val split.

The split is written to `RUN_DIR/split.csv` (columns row, path, label, subset), so that
evaluation and resumed runs use exactly the same images.

Split rule per class with n images in the training pool: n_val = round(n * val_fraction),
at least 1 when n >= 2, and never all of them. A class with a single image stays in train
(and a warning names it): it cannot be validated, but dropping it would hide it from the model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from imgclf import rundir, storage
from imgclf._files import atomic_path
from imgclf.errors import DataError
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.manifest import read_manifest, row_refs, usable_rows

log = logging.getLogger(__name__)
SPLIT_NAME = rundir.SPLIT


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


def make_split(data_dir: str | Path, val_fraction: float, seed: int, exclude: str | Path | None = None) -> pd.DataFrame:
    """Train pool = manifest rows with status ok and split train (val rows, if given, are used as val).

    `exclude` (config data.exclude): a CSV whose rows are left out first (auditdir.excluded_rows).
    """
    manifest = read_manifest(data_dir)
    ok = usable_rows(manifest)
    if exclude is not None:
        from imgclf.auditdir import excluded_rows

        dropped = excluded_rows(exclude, manifest)
        log.info("data.exclude: leaving out %d row(s) listed in %s", int(ok["row"].isin(dropped).sum()), exclude)
        ok = ok[~ok["row"].isin(dropped)].reset_index(drop=True)
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


def read_split(run_dir: Path) -> pd.DataFrame | None:
    """The run's saved split (RUN_DIR/split.csv), or None when the run has none yet."""
    path = Path(run_dir) / SPLIT_NAME
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"path": str, "label": str, "subset": str}, keep_default_na=False)


def write_split(split: pd.DataFrame, run_dir: Path) -> Path:
    path = Path(run_dir) / SPLIT_NAME
    with atomic_path(path) as tmp:
        split.to_csv(tmp, index=False)
    return path


def image_refs(frame: pd.DataFrame, data_dir: str | Path) -> list[storage.RowRef]:
    """Where each row's image is. Frames without the manifest's shard columns (split.csv, a few
    chosen columns) take them from DATA_DIR's manifest by `row`; a files-layout manifest has none."""
    if "shard" in frame or "row" not in frame:
        return row_refs(frame)
    located = read_manifest(data_dir)[["row", "shard", "offset", "bytes"]]
    if not (located["shard"] != "").any():
        return row_refs(frame)
    return row_refs(frame[["row", "path"]].merge(located, on="row", how="left", validate="many_to_one"))


_STORED = ImageLimits(min_side=1)  # stored images were validated at download; any size is fine here


def read_image(data_dir: str | Path, ref: storage.RowRef, limits: ImageLimits = _STORED) -> Image.Image:
    """A row's stored image as RGB (a file, or a member of a tar shard; local or object storage);
    ValueError or OSError naming it when it cannot be read."""
    result = decode_image(storage.read_row(data_dir, ref), limits)
    if isinstance(result, Rejected):
        raise ValueError(f"{storage.join(data_dir, ref.shard or ref.path)}: {result.status}: {result.reason}")
    return result.image


class ImageFolderFrame(Dataset):
    """(image tensor, class index) for each row of a frame with `path` and `label` columns.

    Map-style on purpose: under DDP, Lightning's DistributedSampler gives each rank a disjoint
    share of the indices with equal batch counts, and DataLoader workers split a rank's batches.
    """

    def __init__(self, frame: pd.DataFrame, data_dir: str | Path, class_names: list[str],
                 transform: Callable) -> None:
        self.data_dir = storage.location(data_dir)
        self.refs = image_refs(frame, self.data_dir)
        self.paths = [ref.path for ref in self.refs]
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise DataError(f"labels not known to the model: {', '.join(map(str, unknown[:5]))}")
        self.targets = torch.tensor([index[label] for label in frame["label"]], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(self.data_dir, self.refs[i])
        return self.transform(image), self.targets[i]


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


def decode_resized(image: str | Path | Image.Image, resize_size: int) -> torch.Tensor:
    """Decode a file (or take an image) to a uint8 tensor (3, H, W), shrunk so its shorter side is at
    most resize_size.

    Never enlarges: eval preprocessing resizes to exactly resize_size afterwards, so caching
    the shrunk image gives the same pixels as resizing the original (Resize is a no-op at the
    target size), and small images (28px Fashion-MNIST) stay small in RAM.
    """
    if not isinstance(image, Image.Image):
        image = read_image(Path(image).parent, storage.RowRef(Path(image).name))
    image = pil_to_tensor(image)
    if min(image.shape[-2:]) > resize_size:
        image = resize(image, [resize_size], antialias=True)
    return image


class DecodedImages(Dataset):
    """(uint8 image tensor, class index): decoded in DataLoader workers, optionally from a RAM cache.

    `transform` maps a uint8 tensor to a uint8 tensor of the final size (train augmentation or
    eval resize + crop); normalisation happens on the batch, on the training device.
    """

    def __init__(self, frame: pd.DataFrame, data_dir: str | Path, class_names: list[str],
                 resize_size: int, transform: Callable | None = None) -> None:
        self.files = ImageFolderFrame(frame, data_dir, class_names, transform=_identity)
        self.targets = self.files.targets
        self.resize_size = resize_size
        self.transform = transform
        self.cache: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def decoded(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[i]
        return decode_resized(read_image(self.files.data_dir, self.files.refs[i]), self.resize_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.decoded(i)
        return (self.transform(image) if self.transform else image), self.targets[i]

    def with_transform(self, transform: Callable) -> DecodedImages:
        """A view sharing files and cache, with another transform (train vs eval)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def fill_cache(self, num_workers: int) -> None:
        """Decode every image once (in parallel workers) and keep the uint8 tensors in RAM."""
        plain = self.with_transform(_identity)
        loader = DataLoader(plain, batch_size=64, shuffle=False, num_workers=num_workers, collate_fn=list)
        # clone(): tensors from workers live in shared memory, one file handle each; 60k of them
        # would exhaust the process's descriptors.
        self.cache = [image.clone() for batch in loader for image, _ in batch]


def cache_bytes(data_dir: str | Path, frame: pd.DataFrame, resize_size: int) -> int:
    """Upper estimate of the RAM the decoded cache of `frame` needs (from manifest sizes)."""
    manifest = read_manifest(data_dir)[["row", "width", "height"]]
    sizes = frame[["row"]].merge(manifest, on="row", how="left").fillna(resize_size)
    short = np.minimum(sizes["width"], sizes["height"]).clip(lower=1)
    scale = np.minimum(1.0, resize_size / short)
    return int((3 * (sizes["width"] * scale + 1) * (sizes["height"] * scale + 1)).sum())

"""Datasets built from the download manifest, and the seeded stratified train/val split.

The split is written to `RUN_DIR/split.csv` (columns row, path, label, subset), so that
evaluation and resumed runs use exactly the same images.

Split rule per class with n images in the training pool: n_val = round(n * val_fraction),
at least 1 when n >= 2, and never all of them. A class with a single image stays in train
(and a warning names it): it cannot be validated, but dropping it would hide it from the model.

`task: multilabel` (`label_sep` given): copies of one image (same sha256; rows with status duplicate
too) become one sample whose label cell is the union of their sets, an empty cell is an image with
no label, and the split is iteratively stratified on the label sets (imgclf.multilabel).

A manifest written as parts (more than manifest.PART_ROWS rows) is not split by a global pass:
`hashsplit.ValRule` sends an image to validation by a seeded hash of its sha256 against
val_fraction; training records the rule in run.json instead of writing split.csv (train/_stream.py).
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
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from imgclf import multilabel, rundir, storage
from imgclf._files import atomic_path
from imgclf.csvfile import write_frame
from imgclf.errors import DataError, first_line
from imgclf.images import ImageLimits, Rejected, decode_image
from imgclf.manifest import read_manifest, row_refs, scan, usable_rows
from imgclf.presets import ImageTooLarge
from imgclf.untrusted import check_labels, csv_raw_frame

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


def make_split(data_dir: str | Path, val_fraction: float, seed: int, exclude: str | Path | None = None,
               label_sep: str | None = None) -> pd.DataFrame:
    """Train pool = manifest rows with status ok and split train (val rows, if given, are used as val).

    `exclude` (config data.exclude): a CSV whose rows are left out first (auditdir.excluded_rows);
    a review's decisions.csv also relabels its `relabel` rows (auditdir.relabelled_rows).
    `label_sep` (task: multilabel): label cells are sets; see the module docstring.
    """
    manifest = read_manifest(data_dir)
    ok = usable_rows(manifest) if label_sep is None else _multilabel_rows(manifest, label_sep)
    if exclude is not None:
        from imgclf.auditdir import excluded_rows, relabelled_rows

        dropped = excluded_rows(exclude, manifest)
        log.info("data.exclude: leaving out %d row(s) listed in %s", int(ok["row"].isin(dropped).sum()), exclude)
        ok = ok[~ok["row"].isin(dropped)].reset_index(drop=True)
        relabel = relabelled_rows(exclude, manifest)
        if relabel:
            log.info("data.exclude: relabelling %d row(s) as decided in %s", len(relabel), exclude)
            ok["label"] = ok["row"].map(relabel).fillna(ok["label"])
    pool = ok[ok["split"] == "train"].reset_index(drop=True)
    given_val = ok[ok["split"] == "val"].reset_index(drop=True)
    if pool.empty:
        raise DataError(f"{data_dir}: no downloaded images with split 'train' in the manifest")
    if given_val.empty:
        if label_sep is None:
            is_val = stratified_split(pool["label"], val_fraction, seed)
        else:
            is_val = multilabel.stratified_split(_sets(pool, label_sep), val_fraction, seed)
        subset = np.where(is_val, "val", "train")
        frame = pool.assign(subset=subset)
    else:
        frame = pd.concat([pool.assign(subset="train"), given_val.assign(subset="val")], ignore_index=True)
    return frame[["row", "path", "label", "subset"]]


def _multilabel_rows(manifest: pd.DataFrame, sep: str) -> pd.DataFrame:
    """One row per image, its label set merged over its copies; images without labels counted."""
    rows = manifest[manifest["status"].isin(["ok", "duplicate"])]
    merged = multilabel.merge_by_content(rows, sep)
    copies = len(rows) - len(merged)
    if copies:
        log.info("multilabel: %d copies of images merged into their first row (label sets united)", copies)
    empty = int((merged["label"] == "").sum())
    if empty:
        log.info("multilabel: %d of %d images have no label (trained as all-negative)", empty, len(merged))
    return merged


def _sets(frame: pd.DataFrame, sep: str) -> list[tuple[str, ...]]:
    return [multilabel.parse_labels(cell, sep) for cell in frame["label"].tolist()]


def class_names_of(split: pd.DataFrame, label_sep: str | None = None) -> list[str]:
    """The sorted class names (single-label) or label vocabulary (task: multilabel, `label_sep`)."""
    if label_sep is not None:
        names = multilabel.vocabulary(_sets(split, label_sep))
        if not names:
            raise DataError("task: multilabel: no image carries a label; need at least 1 label to train")
        return names
    names = sorted(split["label"].unique().tolist())
    if len(names) < 2:
        raise DataError(f"need at least 2 classes to train, found {len(names)}: {names}")
    return names


def read_split(run_dir: Path) -> pd.DataFrame | None:
    """The run's saved split (RUN_DIR/split.csv), or None when the run has none yet."""
    path = Path(run_dir) / SPLIT_NAME
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"path": str, "label": str, "subset": str}, keep_default_na=False)
    frame = csv_raw_frame(frame, ("path", "label", "subset"))
    check_labels(frame["label"], lambda i: f"{path}: line {i + 2}")
    return frame


def write_split(split: pd.DataFrame, run_dir: Path) -> Path:
    """split.csv, its text cells spreadsheet-safe (`untrusted.csv_cell`; read_split undoes it)."""
    path = Path(run_dir) / SPLIT_NAME
    with atomic_path(path) as tmp:
        write_frame(split, tmp, index=False)
    return path


def image_refs(frame: pd.DataFrame, data_dir: str | Path) -> list[storage.RowRef]:
    """Where each row's image is. Frames without the manifest's shard columns (split.csv, a few
    chosen columns) take them from DATA_DIR's manifest by `row`; a files-layout manifest has none."""
    if "shard" in frame or "row" not in frame:
        return row_refs(frame)
    located = scan(data_dir, columns=["row", "shard", "offset", "bytes"])
    if not (located["shard"] != "").any():
        return row_refs(frame)
    return row_refs(frame[["row", "path"]].merge(located, on="row", how="left", validate="many_to_one"))


_STORED = ImageLimits(min_side=1)  # stored images were validated at download; any size is fine here


def read_image(data_dir: str | Path, ref: storage.RowRef, limits: ImageLimits = _STORED,
               shard_cache: str | None = None) -> Image.Image:
    """A row's stored image as RGB (a file, or a member of a tar shard; local or object storage;
    `shard_cache`: see storage.read_row); ValueError or OSError naming it when it cannot be read."""
    result = decode_image(storage.read_row(data_dir, ref, shard_cache), limits)
    if isinstance(result, Rejected):
        raise ValueError(f"{storage.join(data_dir, ref.shard or ref.path)}: {result.status}: {result.reason}")
    return result.image


class ReadFailures:
    """Rows whose stored image could not be read: one flag per row in shared memory, so DataLoader
    worker processes mark them and the main process counts them, with no channel of their own."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.flags = torch.zeros(max(n, 1), dtype=torch.bool).share_memory_()

    def mark(self, i: int) -> bool:
        """Flag row i; True the first time (each file is warned about once)."""
        first = not bool(self.flags[i])
        self.flags[i] = True
        return first

    def __contains__(self, i: int) -> bool:
        return bool(self.flags[i])

    def count(self) -> int:
        return int(self.flags[: self.n].sum())

    def mask(self) -> np.ndarray:
        return self.flags[: self.n].numpy().copy()


class ImageFolderFrame(Dataset):
    """(image tensor, class index) for each row of a frame with `path` and `label` columns.

    Map-style on purpose: under DDP, Lightning's DistributedSampler gives each rank a disjoint
    share of the indices with equal batch counts, and DataLoader workers split a rank's batches.
    """

    def __init__(self, frame: pd.DataFrame, data_dir: str | Path, class_names: list[str],
                 transform: Callable, skip_unreadable: bool = False, shard_cache: str | None = None,
                 label_sep: str | None = None) -> None:
        self.data_dir = storage.location(data_dir)
        self.shard_cache = shard_cache  # data.shard_cache: remote tar shards are read from local copies
        self.refs = image_refs(frame, self.data_dir)
        self.paths = [ref.path for ref in self.refs]
        self.transform = transform
        self.failures = ReadFailures(len(self.paths))
        self.skip_unreadable = skip_unreadable  # else an unreadable image raises (ValueError, OSError)
        if label_sep is not None:  # task: multilabel: (N, C) float {0, 1} targets for BCE
            self.targets = torch.from_numpy(multilabel.encode(_sets(frame, label_sep), class_names)).float()
            return
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            shown = ", ".join(map(repr, class_names[:20])) + (", ..." if len(class_names) > 20 else "")
            raise DataError(f"labels not known to the model: {', '.join(map(repr, unknown[:5]))}"
                            f"{', ...' if len(unknown) > 5 else ''}; the model's {len(class_names)} classes: {shown}")
        self.targets = torch.tensor([index[label] for label in frame["label"]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int, limits: ImageLimits = _STORED) -> Image.Image | None:
        """Row i's stored image, or None when it cannot be read: truncated, missing, a path that
        leaves DATA_DIR, too large for the resize that follows. Flagged and warned about once."""
        try:
            return read_image(self.data_dir, self.refs[i], limits, self.shard_cache)
        except (OSError, ValueError, DataError) as err:
            self._failed(i, err)
            return None

    def _failed(self, i: int, err: BaseException) -> None:
        if self.failures.mark(i):
            log.warning("skipping unreadable stored image %s: %s", self.paths[i], first_line(err, 300))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.skip_unreadable:
            return self.transform(read_image(self.data_dir, self.refs[i], shard_cache=self.shard_cache)), \
                self.targets[i]
        # An unreadable image gets a blank stand-in so the batch keeps its shape; `failures` says
        # which rows those are, and the caller drops them (evaluate's NaN rows).
        image = self.read(i)
        if image is not None:
            try:
                return self.transform(image), self.targets[i]
            except ImageTooLarge as err:  # the eval resize would be huge (presets.ResizeGuard)
                self._failed(i, err)
        return self.transform(Image.new("RGB", (1, 1))), self.targets[i]


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


def decode_resized(image: str | Path | Image.Image, resize_size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Decode a file (or take an image) to a uint8 tensor (3, H, W), shrunk so its shorter side is at
    most resize_size.

    Never enlarges: eval preprocessing resizes to exactly resize_size afterwards, so caching
    the shrunk image gives the same pixels as resizing the original (Resize is a no-op at the
    target size), and small images (28px Fashion-MNIST) stay small in RAM.
    """
    if not isinstance(image, Image.Image):
        image = read_image(Path(image).parent, storage.RowRef(Path(image).name), _STORED.for_resize(resize_size))
    image = pil_to_tensor(image)
    if min(image.shape[-2:]) > resize_size:
        # The checkpoint's interpolation (Preprocessing.interpolation), as eval_resize uses it.
        image = resize(image, [resize_size], interpolation=InterpolationMode(interpolation), antialias=True)
    return image


MAX_STAND_INS = 64  # unreadable neighbours skipped for one item before giving up


class DecodedImages(Dataset):
    """(uint8 image tensor, class index): decoded in DataLoader workers, optionally from a RAM cache.

    `transform` maps a uint8 tensor to a uint8 tensor of the final size (train augmentation or
    eval resize + crop); normalisation happens on the batch, on the training device.

    An image that cannot be read (truncated, removed, a path leaving DATA_DIR, an aspect ratio whose
    eval resize would be huge) is flagged in `failures` and the next readable row stands in for it,
    with its own label, so batches keep their shape; `check_unreadable` stops a run when too many are.
    """

    def __init__(self, frame: pd.DataFrame, data_dir: str | Path, class_names: list[str],
                 resize_size: int, transform: Callable | None = None, shard_cache: str | None = None,
                 interpolation: str = "bilinear", label_sep: str | None = None) -> None:
        self.files = ImageFolderFrame(frame, data_dir, class_names, transform=_identity, shard_cache=shard_cache,
                                      label_sep=label_sep)
        self.targets = self.files.targets
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.transform = transform
        self.cache: list[torch.Tensor | None] | None = None
        # Eval resizes the shorter side to resize_size: refuse what that would blow up, before decoding.
        self.limits = _STORED.for_resize(resize_size)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def failures(self) -> ReadFailures:
        return self.files.failures

    def decoded(self, i: int) -> torch.Tensor | None:
        """Row i as a shrunk uint8 tensor, or None when its image cannot be read."""
        if self.cache is not None:
            return self.cache[i]
        if i in self.failures:
            return None
        image = self.files.read(i, self.limits)
        return None if image is None else decode_resized(image, self.resize_size, self.interpolation)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        for j in (i + step for step in range(min(len(self), MAX_STAND_INS))):
            image = self.decoded(j % len(self))
            if image is not None:
                return (self.transform(image) if self.transform else image), self.targets[j % len(self)]
        raise DataError(f"{self.files.data_dir}: {MAX_STAND_INS} stored images in a row are unreadable "
                        f"(from {self.files.paths[i]}); see the warnings above")

    def with_transform(self, transform: Callable) -> DecodedImages:
        """A view sharing files and cache, with another transform (train vs eval)."""
        view = copy.copy(self)
        view.transform = transform
        return view

    def fill_cache(self, num_workers: int) -> None:
        """Decode every image once (in parallel workers) and keep the uint8 tensors in RAM."""
        loader = DataLoader(_Decoder(self), batch_size=64, shuffle=False, num_workers=num_workers,
                            collate_fn=list)
        # clone(): tensors from workers live in shared memory, one file handle each; 60k of them
        # would exhaust the process's descriptors. None: unreadable (flagged in `failures`).
        self.cache = [None if image is None else image.clone() for batch in loader for image in batch]


class _Decoder(Dataset):
    """Row i's decoded image or None, no stand-in: what the cache holds for row i."""

    def __init__(self, images: DecodedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        return self.images.decoded(i)


def check_unreadable(datasets: list[DecodedImages], max_share: float) -> int:
    """How many stored images could not be read so far; a one-line DataError once that is more than
    `max_share` of all images (data.max_unreadable): the data directory needs repair, not a model."""
    bad = sum(d.failures.count() for d in datasets)
    total = sum(getattr(d, "n_rows", None) or len(d) for d in datasets)  # a stream's len() counts batches
    if total and bad / total > max_share:
        raise DataError(f"{bad} of {total} stored images are unreadable ({bad / total:.1%}, more than "
                        f"data.max_unreadable={max_share}); see the warnings above, then repair or "
                        "re-download the data directory")
    return bad


def cache_bytes(data_dir: str | Path, frame: pd.DataFrame, resize_size: int) -> int:
    """Upper estimate of the RAM the decoded cache of `frame` needs (from manifest sizes)."""
    manifest = scan(data_dir, columns=["row", "width", "height"])
    sizes = frame[["row"]].merge(manifest, on="row", how="left").fillna(resize_size)
    short = np.minimum(sizes["width"], sizes["height"]).clip(lower=1)
    scale = np.minimum(1.0, resize_size / short)
    return int((3 * (sizes["width"] * scale + 1) * (sizes["height"] * scale + 1)).sum())

"""Training on a manifest written as parts (more than manifest.PART_ROWS rows): a stream, never one
frame of every row (issue 25 item 2; docs/scale.md "training on a parts manifest").

- The split: the manifest's own `val` rows when it has any, else `hashsplit.ValRule` (a seeded hash of
  each row's sha256 against data.val_fraction). No split.csv: run.json's `split_rule` records the
  rule, resume reads it back, and evaluate applies the same rule.
- Class names and per-subset counts: one streaming pass (`hashsplit.subset_label_counts`).
- The loaders: `StreamImages`, an IterableDataset over `manifest.epoch_batches` (row groups in a
  seeded order, rows shuffled within a window of groups, reseeded every epoch). The epoch's rows
  are cut into batches; global batch g belongs to DDP rank g % world and, on that rank, to
  DataLoader worker (g // world) % workers, so no two readers decode the same row. Every reader
  walks the epoch's metadata (a few columns: cheap next to decoding) and decodes only its own
  batches. A rank gets exactly n_train // (batch_size * world) train batches (the tail is dropped,
  as drop_last does), so every DDP rank steps the same number of times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgclf import data, hashsplit, manifest, presets, rundir
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError, DataError, first_line
from imgclf.presets import ImageTooLarge
from imgclf.untrusted import check_labels

log = logging.getLogger("imgclf.train")

COLUMNS = ["row", "path", "label", "sha256", "shard", "offset", "bytes"]
MAX_WORKERS = 256  # slots of the shared failure counter (one per DataLoader worker, plus the main process)


@dataclass(frozen=True)
class StreamSplit:
    """The train/val split of a parts manifest, as a rule and counts (what split.csv is for a frame)."""

    data_dir: Path | str
    rule: hashsplit.ValRule | None  # None: the manifest's own val split is the validation subset
    counts: dict[str, dict[str, int]]  # "train"/"val" -> label -> usable rows
    excluded: frozenset[int] = frozenset()  # rows data.exclude leaves out

    @property
    def class_names(self) -> list[str]:
        names = sorted(set(self.counts["train"]) | set(self.counts["val"]))
        if len(names) < 2:
            raise DataError(f"need at least 2 classes to train, found {len(names)}: {names}")
        return names

    def rows(self, subset: str) -> int:
        return sum(self.counts[subset].values())

    def run_info_fields(self) -> dict[str, Any]:
        """run.json's record of the split (evaluate reads it to find the val rows)."""
        rule = self.rule.as_json() if self.rule else {"kind": "manifest", "val": "the manifest's split 'val'"}
        return {"split_rule": {**rule, "train_rows": self.rows("train"), "val_rows": self.rows("val")}}


def run_info_fields(split: pd.DataFrame | StreamSplit) -> dict[str, Any]:
    return split.run_info_fields() if isinstance(split, StreamSplit) else {}


def check_options(config: TrainConfig, data_dir: Path | str) -> None:
    """Options that need every row in memory (a global pass, random access) refuse a stream."""
    cfg, model = config.data, config.model
    needs_rows = {
        "task: multilabel": config.task == "multilabel",
        "data.balanced_sampler": cfg.balanced_sampler,
        "data.augment.hflip=alternate": cfg.augment.hflip == "alternate",
        "data.cache=true": cfg.cache is True,
        "model.head_init=probe": model.head_init == "probe",
        "model.keep=better": model.keep == "better",
        f"model.stem_init={model.stem_init}": model.stem_init != "default",
    }
    bad = [name for name, on in needs_rows.items() if on]
    if bad:
        raise ConfigError(f"{data_dir}: its manifest is written as parts and is streamed; {', '.join(bad)} "
                          "need(s) every row in memory (see docs/scale.md); leave it out for this data")


def stream_split(config: TrainConfig, data_dir: Path | str, run_dir: Path, resume: bool) -> StreamSplit:
    """The split of a parts manifest; a resumed run keeps the rule its run.json recorded."""
    check_options(config, data_dir)
    rule = hashsplit.ValRule(config.seed, config.data.val_fraction)
    info = rundir.RunDir(run_dir).read_info() if resume else None
    saved = getattr(info, "split_rule", None) if info is not None else None
    if isinstance(saved, dict) and saved.get("kind") == "hash":
        rule = hashsplit.ValRule.from_json(saved, str(rundir.RunDir(run_dir).info_path))
    excluded = excluded_rows(config.data.exclude, data_dir) if config.data.exclude else frozenset()
    counts = hashsplit.subset_label_counts(data_dir, rule, excluded)
    if counts["given_val"]:  # the manifest's own val split, as make_split uses it
        train = {k: counts["train"].get(k, 0) + counts["val"].get(k, 0) for k in counts["train"].keys()
                 | counts["val"].keys()}
        split = StreamSplit(data_dir, None, {"train": train, "val": counts["given_val"]}, excluded)
    else:
        split = StreamSplit(data_dir, rule, {"train": counts["train"], "val": counts["val"]}, excluded)
    if not split.rows("train"):
        raise DataError(f"{data_dir}: no downloaded images with split 'train' in the manifest")
    if not split.rows("val"):
        raise DataError(f"{data_dir}: no validation images (val_fraction {rule.fraction} drew none); add images")
    names = split.class_names
    check_labels(pd.Series(names), lambda i: f"{data_dir}: label {names[i]!r}")
    unvalidated = [n for n in names if not split.counts["val"].get(n)]
    if unvalidated:
        log.warning("%d class(es) have no validation image (the hash split is per image, not per class): %s",
                    len(unvalidated), ", ".join(map(repr, unvalidated[:10])))
    log.info("streaming the parts manifest of %s: %d train and %d val images, %d classes (split: %s)", data_dir,
             split.rows("train"), split.rows("val"), len(names), "manifest" if split.rule is None else "hash")
    return split


def excluded_rows(path: str, data_dir: Path | str) -> frozenset[int]:
    """data.exclude's rows (audit.csv, decisions.csv drops, any CSV with `row`), checked against the
    manifest rows they name only (found by a pushed-down filter, not a frame of every row)."""
    from imgclf import auditdir

    findings = auditdir.read_findings(path)
    if auditdir.is_decisions(findings) and (findings["action"] == "relabel").any():
        raise ConfigError(f"data.exclude={path}: relabel decisions need every row in memory to check the new "
                          f"labels; with the parts manifest of {data_dir}, exclude drops only")
    named = manifest.rows_of(data_dir, set(findings["row"].tolist()), ["row", "sha256"])
    rows = frozenset(auditdir.excluded_rows(path, named))
    log.info("data.exclude: leaving out %d row(s) listed in %s", len(rows), path)
    return rows


class StreamFailures:
    """Unreadable images counted in shared memory, one slot per DataLoader worker (no lock needed);
    reset at every epoch start, so the count is that of the current pass over the data."""

    def __init__(self) -> None:
        self.slots = torch.zeros(MAX_WORKERS + 1, dtype=torch.long).share_memory_()

    def mark(self) -> None:
        info = get_worker_info()
        self.slots[0 if info is None else 1 + info.id % MAX_WORKERS] += 1

    def count(self) -> int:
        return int(self.slots.sum())

    def reset(self) -> None:
        self.slots.zero_()


@dataclass
class StreamImages(IterableDataset):
    """Batches (uint8 images, class indices) of one subset of a parts manifest, decoded in the
    DataLoader workers (use it with batch_size=None); see the module docstring for who reads what."""

    split: StreamSplit
    subset: str  # "train" (shuffled per epoch, tail dropped) or "val" (every row, fixed order)
    class_names: list[str]
    batch_size: int
    transform: Any
    pre: presets.Preprocessing
    seed: int
    shard_cache: str | None = None
    epoch: int = 0
    rank: int = 0
    world: int = 1
    failures: StreamFailures = field(default_factory=StreamFailures)

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.class_names)}
        self.data_dir = self.split.data_dir
        self.limits = data._STORED.for_resize(self.pre.resize_size)

    @property
    def n_rows(self) -> int:
        return self.split.rows(self.subset)

    def __len__(self) -> int:
        """Batches this rank yields in one pass."""
        if self.subset == "train":
            return self.n_rows // self.batch_size // self.world
        return len(range(self.rank, -(-self.n_rows // self.batch_size), self.world))

    def rows(self, seed: int) -> Any:
        """This subset's rows (COLUMNS) in the epoch's order, as frames of up to 65,536 rows."""
        given = self.split.rule is None
        for frame in manifest.epoch_batches(self.data_dir, self.subset if given else "train", seed, COLUMNS):
            if self.split.excluded:
                frame = frame[~frame["row"].isin(self.split.excluded)]
            if not given:
                frame = frame[self.split.rule.is_val(frame["sha256"].tolist()) == (self.subset == "val")]
            if len(frame):
                yield frame

    def epoch_seed(self) -> int:
        """Train: a new order every epoch, the same for every rank and worker. Val: one fixed order."""
        epoch = self.epoch if self.subset == "train" else -1
        return int(np.random.SeedSequence([self.seed, epoch + 1]).generate_state(1)[0])

    def batches(self) -> Any:
        """(global batch number, rows) over the epoch, cut from the row stream."""
        pending, g = [], 0
        held = 0
        for frame in self.rows(self.epoch_seed()):
            pending.append(frame)
            held += len(frame)
            while held >= self.batch_size:
                block = pd.concat(pending, ignore_index=True)
                yield g, block.iloc[:self.batch_size]
                g += 1
                pending, held = [block.iloc[self.batch_size:]], held - self.batch_size
        if held and self.subset == "val":
            yield g, pd.concat(pending, ignore_index=True)

    def own_batches(self, worker: int, workers: int) -> Any:
        """The rows of this rank's and this worker's batches, in order."""
        limit = len(self)
        for g, rows in self.batches():
            if g % self.world != self.rank:
                continue
            local = g // self.world
            if local >= limit:
                return
            if local % workers == worker:
                yield rows

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for rows in self.own_batches(worker, workers):
            yield self.decode(rows)

    def decode(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's images; an unreadable one is counted, warned about, and replaced by a readable
        image of the same batch with that image's label, so the batch keeps its shape."""
        images, targets = [], []
        for ref, label in zip(manifest.row_refs(rows), rows["label"].tolist(), strict=True):
            try:
                image = data.read_image(self.data_dir, ref, self.limits, self.shard_cache)
                images.append(self.transform(data.decode_resized(image, self.pre.resize_size,
                                                                 self.pre.interpolation)))
                targets.append(self.index[label])
            except (OSError, ValueError, DataError, ImageTooLarge) as err:
                self.failures.mark()
                log.warning("skipping unreadable stored image %s: %s", ref.path, first_line(err, 300))
        if not images:
            raise DataError(f"{self.data_dir}: all {len(rows)} stored images of a batch are unreadable "
                            f"(from {rows['path'].iloc[0]}); see the warnings above")
        stand_ins = [i % len(images) for i in range(len(rows) - len(images))]
        return (torch.stack(images + [images[i] for i in stand_ins]),
                torch.tensor(targets + [targets[i] for i in stand_ins], dtype=torch.long))

    def preview(self, count: int = 64) -> data.DecodedImages:
        """A map-style set of the first `count` rows of epoch 0 (for batch_preview.png)."""
        head = next(self.rows(self.epoch_seed()), None)
        if head is None:
            raise DataError(f"{self.data_dir}: no '{self.subset}' rows to preview")
        return data.DecodedImages(head.iloc[:count], self.data_dir, self.class_names, self.pre.resize_size,
                                  self.transform, shard_cache=self.shard_cache, interpolation=self.pre.interpolation)


def previewable(dataset: Any) -> Any:
    return dataset.preview() if isinstance(dataset, StreamImages) else dataset


class StreamPosition(pl.Callback):
    """Tells the stream datasets their DDP rank and world size (before Lightning counts batches) and
    the epoch (before the workers start: they are not persistent, so each epoch copies it anew)."""

    def __init__(self) -> None:
        self.datasets: list[StreamImages] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for dataset in self.datasets:
            dataset.rank, dataset.world = trainer.global_rank, trainer.world_size

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for dataset in self.datasets:
            dataset.epoch = trainer.current_epoch
            dataset.failures.reset()


def loaders(config: TrainConfig, split: StreamSplit, class_names: list[str],
            pre: presets.Preprocessing) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders over the stream (no RAM cache: at this size it would not fit)."""
    cfg = config.data
    if cfg.cache == "auto":
        log.info("decoded-image cache: off (a streamed parts manifest)")
    sets = [StreamImages(split, "train", class_names, config.trainer.batch_size,
                         presets.train_augment(pre, cfg.augment), pre, config.seed, cfg.shard_cache),
            StreamImages(split, "val", class_names, config.trainer.batch_size * 2, presets.eval_resize(pre), pre,
                         config.seed, cfg.shard_cache)]
    if not len(sets[0]):  # the tail is dropped: fewer rows than one batch would train nothing
        raise DataError(f"{split.data_dir}: {split.rows('train')} train images make no full batch of "
                        f"trainer.batch_size={config.trainer.batch_size}; lower it")
    # Not persistent: each epoch's workers start from the dataset as StreamPosition left it.
    common: dict[str, Any] = {"batch_size": None, "num_workers": cfg.num_workers,
                              "pin_memory": torch.cuda.is_available()}
    return DataLoader(sets[0], **common), DataLoader(sets[1], **common)


def train_counts(split: StreamSplit, class_names: list[str]) -> torch.Tensor:
    return torch.tensor([float(split.counts["train"].get(name, 0)) for name in class_names])

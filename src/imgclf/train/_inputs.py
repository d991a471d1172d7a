"""What training reads: the run's train/val split and the data loaders over it (decoding, the
optional decoded-image cache, the balanced sampler), and the class weights of the loss."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from imgclf import data, manifest, presets
from imgclf.config import TrainConfig
from imgclf.errors import DataError
from imgclf.train import _stream, _tricks
from imgclf.train._stream import StreamSplit

log = logging.getLogger("imgclf.train")


def make_split(config: TrainConfig, data_dir: Path, run_dir: Path, resume: bool) -> pd.DataFrame | StreamSplit:
    """The run's saved split (resume) or a new one; every DDP rank derives the same one from the seed.

    Without --resume a split.csv left by an attempt that died before its first checkpoint is
    replaced: the data, seed or val_fraction may have changed since, and nothing trained is lost.
    A manifest written as parts is streamed: its split is a rule and counts (train/_stream.py).
    """
    if manifest.is_parts(data_dir):
        return _stream.stream_split(config, data_dir, run_dir, resume)
    split = data.read_split(run_dir) if resume else None
    if split is None:
        split = data.make_split(data_dir, config.data.val_fraction, config.seed, config.data.exclude,
                                label_sep(config))
    if not (split["subset"] == "val").any():
        raise DataError(f"{data_dir}: no validation images (every class has a single image); add images")
    return split


def label_sep(config: TrainConfig) -> str | None:
    """data.label_sep under task: multilabel (label cells are sets), else None (one label per cell)."""
    return config.data.label_sep if config.task == "multilabel" else None


def class_names(config: TrainConfig, split: pd.DataFrame | StreamSplit) -> list[str]:
    if isinstance(split, StreamSplit):
        return split.class_names
    return data.class_names_of(split, label_sep(config))


def loaders(config: TrainConfig, split: pd.DataFrame | StreamSplit, data_dir: Path, class_names: list[str],
            pre: presets.Preprocessing, position: _stream.StreamPosition | None = None
            ) -> tuple[DataLoader, DataLoader]:
    """The train and val loaders; a streamed split's datasets are handed to `position` (its callback)."""
    if isinstance(split, StreamSplit):
        train_loader, val_loader = _stream.loaders(config, split, class_names, pre)
        if position is not None:
            position.datasets = [train_loader.dataset, val_loader.dataset]
        return train_loader, val_loader
    cfg = config.data
    train_rows, val_rows = split[split["subset"] == "train"], split[split["subset"] == "val"]
    train_set = data.DecodedImages(train_rows, data_dir, class_names, pre.resize_size,
                                   presets.train_augment(pre, cfg.augment), shard_cache=cfg.shard_cache,
                                   interpolation=pre.interpolation, label_sep=label_sep(config))
    val_set = data.DecodedImages(val_rows, data_dir, class_names, pre.resize_size, presets.eval_resize(pre),
                                 shard_cache=cfg.shard_cache, interpolation=pre.interpolation,
                                 label_sep=label_sep(config))
    if _use_cache(cfg, data_dir, split, pre):
        t0 = time.perf_counter()
        for dataset in (train_set, val_set):
            dataset.fill_cache(cfg.num_workers)
        log.info("cached %d decoded images in RAM in %.1fs", len(split), time.perf_counter() - t0)
    sampler = None
    if cfg.balanced_sampler:
        counts = torch.bincount(train_set.targets, minlength=len(class_names)).clamp(min=1)
        sampler = WeightedRandomSampler((1.0 / counts)[train_set.targets].double(), len(train_set),
                                        generator=torch.Generator().manual_seed(config.seed))
    dataset: Any = train_set
    if cfg.augment.hflip == "alternate":
        dataset, sampler = _tricks.alternating_flip(train_set, sampler, config.seed)
    common: dict[str, Any] = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0,
                              "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(dataset, batch_size=config.trainer.batch_size, shuffle=sampler is None,
                              sampler=sampler, drop_last=len(train_set) > config.trainer.batch_size, **common)
    val_loader = DataLoader(val_set, batch_size=config.trainer.batch_size * 2, shuffle=False, **common)
    return train_loader, val_loader


def _use_cache(cfg: Any, data_dir: Path, split: pd.DataFrame, pre: presets.Preprocessing) -> bool:
    if cfg.cache is not True and cfg.cache != "auto":
        return False
    if cfg.cache is True:
        return True
    need = data.cache_bytes(data_dir, split, pre.resize_size)
    fits = need <= cfg.cache_max_gb * 1e9
    log.info("decoded-image cache: %.2f GB needed, budget %.2f GB -> %s", need / 1e9, cfg.cache_max_gb,
             "on" if fits else "off")
    return fits


def class_weights(config: TrainConfig, split: pd.DataFrame | StreamSplit,
                  class_names: list[str]) -> torch.Tensor | None:
    """'balanced': n / (k * n_c), as scikit-learn defines it; classes absent from train weigh 1."""
    if config.loss.class_weights != "balanced":
        return None
    if isinstance(split, StreamSplit):
        counts = _stream.train_counts(split, class_names)
    else:
        train_labels = split.loc[split["subset"] == "train", "label"]
        counts = torch.tensor([float((train_labels == name).sum()) for name in class_names])
    weights = counts.sum() / (len(class_names) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.ones_like(weights))

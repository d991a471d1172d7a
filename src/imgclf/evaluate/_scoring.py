"""The model side of evaluate: any model `inference.load` opens, scored over a split.

Evaluate takes a model wherever predict, export and serve do, through the same loader.
PyTorch weights run on the chosen device; an exported file runs on its own backend
(onnxruntime or TorchScript). Images are decoded by DataLoader workers and preprocessed a batch
at a time by predict's preprocessor (`inference.eval_preprocessor`, bitwise `presets.eval_transform`
on torchvision's kernel, whatever the backend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imgclf.data import ImageFolderFrame
from imgclf.errors import DataError, first_line
from imgclf.inference import ModelHandle, Preprocessor, eval_preprocessor, load
from imgclf.models import fast_layout
from imgclf.presets import Preprocessing, ResizeGuard
from imgclf.progress import track

log = logging.getLogger("imgclf.evaluate")


@dataclass
class EvalModel:
    """A handle plus the probabilities evaluate scores with (float64, rows summing to 1)."""

    handle: ModelHandle
    # normalised float batch -> (N, K) float64 probabilities (softmax; sigmoid for task: multilabel)
    probabilities: Callable[[torch.Tensor], np.ndarray] = field(repr=False)

    @property
    def path(self) -> Path:
        return self.handle.path

    @property
    def arch(self) -> str:
        return self.handle.arch

    @property
    def preprocessing(self) -> Preprocessing:
        return self.handle.preprocessing

    @property
    def config(self) -> dict[str, Any]:
        """The training config as plain data ({} for exported files)."""
        return self.handle.config.to_plain() if self.handle.config is not None else {}

    @property
    def task(self) -> str:
        return self.handle.task  # "single_label" or "multilabel" (imgclf.multilabel.TASK)

    @property
    def thresholds(self) -> list[float] | None:
        return self.handle.thresholds  # task: multilabel: one per class, from the model's metadata

    @property
    def class_names(self) -> list[str]:
        return self.handle.class_names

    @property
    def num_workers(self) -> int:
        """The run's data.num_workers (decoding processes); 0 for exported files."""
        return self.handle.config.data.num_workers if self.handle.config is not None else 0


def probabilities(handle: ModelHandle) -> Callable[[torch.Tensor], np.ndarray]:
    """The handle's probabilities in float64, as log loss wants them."""
    module = handle.module
    multilabel = handle.task == "multilabel"
    if module is None:
        def exported(batch: torch.Tensor) -> np.ndarray:
            proba = np.asarray(handle.backend.probabilities(batch), dtype=np.float64)
            if multilabel:  # independent sigmoid outputs: rows do not sum to 1
                return proba
            # float32 softmax from the exported graph, renormalised in float64 so rows sum to 1 for log loss.
            return proba / proba.sum(axis=1, keepdims=True)

        return exported

    def torch_proba(batch: torch.Tensor) -> np.ndarray:
        logits = module(fast_layout(batch.to(handle.device, non_blocking=True)))
        if multilabel:  # independent labels: sigmoid per output
            return torch.sigmoid(logits.double()).cpu().numpy()
        # float64 softmax: probabilities sum to 1 closely enough for log loss.
        return torch.softmax(logits.double(), dim=1).cpu().numpy()

    return torch_proba


def open_model(path: Path, device: str) -> EvalModel:
    handle = load(path, device=device)
    return EvalModel(handle, probabilities(handle))


class _Collate:
    """A DataLoader worker's batch: decoded images -> one preprocessed float32 tensor (N, 3, S, S)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self._prepare: Preprocessor | None = None  # built where it runs (a worker): torch modules do not pickle

    def __call__(self, items: list[tuple[Image.Image, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prepare is None:
            self._prepare = eval_preprocessor(self.pre)
        return torch.from_numpy(self._prepare([image for image, _ in items])), torch.stack([t for _, t in items])


def predict_proba(model: EvalModel, frame: pd.DataFrame, images_root: Path, batch_size: int,
                  num_workers: int | None, progress: bool = True,
                  label_sep: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 probabilities and (N,) true class indices (with `label_sep`, task: multilabel:
    (N, K) {0, 1} label sets), in frame order; the rows of images that could not be read (warned
    about, see data.ImageFolderFrame.read) are NaN."""
    pre = model.handle.preprocessing
    dataset = ImageFolderFrame(frame, images_root, model.class_names, ResizeGuard(pre.resize_size),
                               skip_unreadable=True, label_sep=label_sep)
    workers = model.num_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_Collate(pre), pin_memory=torch.cuda.is_available())
    chunks = []
    try:
        with torch.inference_mode():
            for images, _ in track(loader, "evaluate", len(dataset), enabled=progress, size=lambda b: len(b[0])):
                chunks.append(model.probabilities(images))
    except (ValueError, OSError) as err:  # a file removed or corrupted since download
        raise DataError(f"cannot read an evaluation image: {first_line(err)}") from None
    proba = np.concatenate(chunks)
    proba[dataset.failures.mask()] = np.nan
    return proba, dataset.targets.numpy()


def drop_unreadable(proba: np.ndarray, y_true: np.ndarray, images: Any,
                    max_share: float) -> tuple[np.ndarray, np.ndarray, Any, int]:
    """Leave out the images that could not be read (NaN rows; each was warned about); a one-line
    DataError when they are more than `max_share` of the split: scores on the rest would mislead.
    Single-label and multi-label evaluation alike: `images` is either's dataclass of the split's rows
    (`frame`, one row an image, and `split`); the same kind comes back, without the unreadable rows."""
    bad = np.isnan(proba).any(axis=1)
    n = int(bad.sum())
    if n and n / len(bad) > max_share:
        raise DataError(f"{n} of {len(bad)} images of split '{images.split}' are unreadable "
                        f"({n / len(bad):.1%}, more than {max_share:.0%}); see the warnings above")
    if n:
        log.warning("%d unreadable image(s) left out of the evaluation (unreadable_images in metrics.json)", n)
        images = replace(images, frame=images.frame[~bad].reset_index(drop=True))
    return proba[~bad], y_true[~bad], images, n

"""The model side of evaluate: open any model (run, checkpoint, ONNX, TorchScript), score a split.

Evaluate takes a model wherever predict, export and serve do (`imgclf.modelfile.identify`).
PyTorch weights run on the chosen device; an exported file runs on its own backend
(onnxruntime or TorchScript), through the same eval preprocessing stored with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from imgclf.data import ImageFolderFrame
from imgclf.errors import ConfigError, DataError, first_line
from imgclf.modelfile import ModelKind, identify
from imgclf.models import fast_layout
from imgclf.presets import Preprocessing, eval_transform
from imgclf.progress import track


@dataclass
class EvalModel:
    """What evaluate needs to know about a model, whatever file it came from."""

    path: Path
    class_names: list[str]
    preprocessing: Preprocessing
    arch: str
    config: dict[str, Any]  # the training config as plain data ({} for exported files)
    num_workers: int  # the run's data.num_workers (decoding processes), 0 for exported files
    # normalised float batch -> (N, K) float64 probabilities (softmax; sigmoid for task: multilabel)
    probabilities: Callable[[torch.Tensor], np.ndarray] = field(repr=False)
    task: str = "single_label"  # or "multilabel" (imgclf.multilabel.TASK)
    thresholds: list[float] | None = None  # task: multilabel: one per class, from the checkpoint


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: no such CUDA device here "
                          f"({torch.cuda.device_count()} visible); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def _torch_model(path: Path, device: torch.device) -> EvalModel:
    from imgclf.checkpoint import load_model

    loaded = load_model(path)
    model = loaded.model.to(device).eval()
    multilabel = loaded.task == "multilabel"

    def probabilities(batch: torch.Tensor) -> np.ndarray:
        logits = model(fast_layout(batch.to(device, non_blocking=True)))
        if multilabel:  # independent labels: sigmoid per output
            return torch.sigmoid(logits.double()).cpu().numpy()
        # float64 softmax: probabilities sum to 1 closely enough for log loss.
        return torch.softmax(logits.double(), dim=1).cpu().numpy()

    return EvalModel(loaded.path, loaded.class_names, loaded.preprocessing, loaded.config.model.arch,
                     loaded.config.to_plain(), loaded.config.data.num_workers, probabilities,
                     loaded.task, loaded.thresholds)


def _exported_model(path: Path, kind: ModelKind, device_name: str) -> EvalModel:
    from imgclf.inference import load_classifier
    from imgclf.modelfile import load_torchscript, read_onnx_metadata

    if device_name not in ("auto", "cpu"):
        raise ConfigError(f"--device {device_name}: {path} is an exported {kind.value} file, which runs on its "
                          "own backend; evaluate the run directory or checkpoint to choose a device")
    meta = read_onnx_metadata(path) if kind == ModelKind.ONNX else load_torchscript(path)[1]
    backend = load_classifier(path).backend
    # Exported multi-label files carry task and thresholds in their metadata (absent: single-label).
    task, thresholds = getattr(meta, "task", "single_label"), getattr(meta, "thresholds", None)

    def probabilities(batch: torch.Tensor) -> np.ndarray:
        proba = np.asarray(backend.probabilities(batch), dtype=np.float64)
        if task == "multilabel":  # independent sigmoid outputs: rows do not sum to 1
            return proba
        # float32 softmax from the exported graph, renormalised in float64 so rows sum to 1 for log loss.
        return proba / proba.sum(axis=1, keepdims=True)

    return EvalModel(path, meta.class_names, meta.preprocessing, meta.arch, {}, 0, probabilities, task, thresholds)


def open_model(path: Path, device: str) -> EvalModel:
    kind = identify(path)
    if kind in (ModelKind.RUN, ModelKind.CHECKPOINT):
        return _torch_model(path, _device(device))
    return _exported_model(path, kind, device)


def predict_proba(model: EvalModel, frame: pd.DataFrame, images_root: Path, batch_size: int,
                  num_workers: int | None, progress: bool = True,
                  label_sep: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 probabilities and (N,) true class indices (with `label_sep`, task: multilabel:
    (N, K) {0, 1} label sets), in frame order; the rows of images that could not be read (warned
    about, see data.ImageFolderFrame.read) are NaN."""
    dataset = ImageFolderFrame(frame, images_root, model.class_names, eval_transform(model.preprocessing),
                               skip_unreadable=True, label_sep=label_sep)
    workers = model.num_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available())
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

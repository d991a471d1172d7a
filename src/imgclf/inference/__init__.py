"""A model ready to classify images, whatever file it came from (core layer).

`load(path, backend, device) -> ModelHandle` (inference/_handle.py) is the one way every stage
opens a run directory or checkpoint (PyTorch), or a file written by `imgclf export` (ONNX through
onnxruntime, or TorchScript); `modelfile.identify` decides which by content. A `Classifier`
(`load_classifier(path)`, or `Classifier.of(handle)`) is a handle's backend plus the class names
and eval preprocessing stored with the model. predict, serve and the Python API classify through it:

    batch = classifier.prepare_batch(images)    # RGB images -> float32 (N, 3, S, S)
    probs = classifier.probabilities(batch)     # -> (N, C), what TTA or ensembles can wrap

`prepare_batch` is `presets.eval_transform` applied to a whole batch (inference/_preprocess.py):
bitwise equal for the torch backends; for ONNX it runs without torch (Pillow's resampler, at
most 1 level in 255 from torchvision's). torch is imported only by the torch backends, so an
ONNX model starts and runs without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.images import ImageLimits
from imgclf.inference import _tta
from imgclf.inference._backends import Backend
from imgclf.inference._handle import BACKENDS, ModelHandle, load
from imgclf.inference._preprocess import PillowResize, Preprocessor, TorchResize, torch_free
from imgclf.presets import Preprocessing

__all__ = ["BACKENDS", "PREDICT_LIMITS", "Backend", "Classifier", "ModelHandle", "Preprocessor", "eval_preprocessor",
           "load", "load_classifier", "preprocess_pool"]

# Prediction accepts any size an image viewer would show; the bomb limit still applies.
PREDICT_LIMITS = ImageLimits(min_side=1)
Scores = list[tuple[str, float]]  # (label, probability), highest first


@dataclass
class Classifier:
    """A backend plus the class names and preprocessing that belong to it."""

    backend: Backend
    class_names: list[str]
    preprocessing: Preprocessing
    source: str  # the model path, for logs and /health
    tta: str = "none"  # test-time augmentation, averaged over views (inference/_tta.py): none, flip, crops
    handle: ModelHandle | None = field(default=None, repr=False)  # what `load` opened (arch, meta, module)
    # task: multilabel: probabilities are per-label sigmoids and a label is predicted at or above its
    # threshold (chosen on the validation split at training, stored with the model); None: single-label.
    thresholds: list[float] | None = None
    preprocessor: Preprocessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # ONNX runs without torch, so its inputs are resized by Pillow; the torch backends have
        # torch at hand and use torchvision's own kernel, exactly as evaluation does.
        pillow = self.backend.name == "onnx" and torch_free(self.preprocessing)
        self.preprocessor = Preprocessor(self.preprocessing, PillowResize(self.preprocessing)) if pillow \
            else eval_preprocessor(self.preprocessing)

    @classmethod
    def of(cls, handle: ModelHandle) -> Classifier:
        return cls(handle.backend, handle.class_names, handle.preprocessing, str(handle.path), handle=handle,
                   thresholds=handle.thresholds)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def outputs(self, probs: np.ndarray, k: int) -> list[tuple[Scores, Scores | None]]:
        """(N, C) probabilities -> per row (top-k, the labels above their thresholds or None when single-label)."""
        tops = self.top_k_batch(probs, k)
        if self.thresholds is None:
            return [(top, None) for top in tops]
        from imgclf.multilabel import decode

        return list(zip(tops, decode(probs, self.class_names, self.thresholds), strict=True))

    @property
    def uses_torch(self) -> bool:
        """Whether preprocessing or the model runs torch ops (their threads want set_num_threads)."""
        return isinstance(self.preprocessor.resize, TorchResize) or self.backend.name != "onnx"

    def prepare_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images (any sizes) -> the model's input, float32 (N, 3, image_size, image_size)."""
        return self.preprocessor(images)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> float32 (3, image_size, image_size)."""
        return self.preprocessor([image])[0]

    def probabilities(self, batch: Any) -> np.ndarray:
        """(N, 3, H, W) normalised float batch (array, tensor, or a list of per-image ones) -> (N, C)."""
        if isinstance(batch, list | tuple):
            batch = np.stack([np.asarray(item, dtype=np.float32) for item in batch])
        return _tta.probabilities(self.backend.probabilities, batch, self.tta)

    def set_model_threads(self, threads: int) -> None:
        """Intra-op threads of a torch model (ONNX sessions keep theirs: their idle threads sleep)."""
        setter = getattr(self.backend, "set_threads", None)
        if setter is not None:
            setter(threads)

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        return self.top_k_batch(probs[None, :], k)[0]

    def top_k_batch(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """(N, C) probabilities -> per row the k most likely (label, probability), ties in class order.

        One argsort for the whole batch: per row it cost predict's model thread ~6 us an image.
        """
        order = np.argsort(-probs, axis=1, kind="stable")[:, : max(1, min(k, len(self.class_names)))]
        values = np.take_along_axis(probs, order, axis=1).tolist()  # Python floats, as float() gives
        names = self.class_names
        return [[(names[i], p) for i, p in zip(row, vals, strict=True)]
                for row, vals in zip(order.tolist(), values, strict=True)]


def eval_preprocessor(pre: Preprocessing) -> Preprocessor:
    """The batched eval preprocessing on torchvision's kernel: bitwise `presets.eval_transform`."""
    return Preprocessor(pre, TorchResize(pre))


def load_classifier(model_path: str | Path, backend: str = "auto") -> Classifier:
    """Open a run directory, checkpoint, .onnx or TorchScript file as a Classifier (on CPU)."""
    return Classifier.of(load(model_path, backend))


def _single_threaded_torch() -> None:
    import torch

    # Per thread (OpenMP semantics): preprocessing threads run torch ops on small images, where
    # intra-op threads only fight the model's own threads for the cores (measured: 5-10x slower).
    torch.set_num_threads(1)


def preprocess_pool(threads: int, classifier: Classifier | None = None) -> ThreadPoolExecutor:
    """Threads for reading, decoding and preprocessing; torch ops in them run single-threaded.

    Without a classifier, or with one that runs no torch op (ONNX), the threads leave torch alone
    (and unimported).
    """
    torch_ops = classifier is None or classifier.uses_torch
    return ThreadPoolExecutor(threads, thread_name_prefix="imgclf-prep",
                              initializer=_single_threaded_torch if torch_ops else None)

"""A model ready to classify images, whatever file it came from (core layer).

`load_classifier(path)` opens a run directory or checkpoint (PyTorch), or a file written by
`imgclf export` (ONNX through onnxruntime, or TorchScript); `modelfile.identify` decides which
by content. A `Classifier` is a backend plus the class names and eval preprocessing stored
with the model, applied with `presets.eval_transform`, never re-implemented. predict, serve,
evaluate and the Python API (`imgclf.load`) all classify through it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgclf.errors import ConfigError
from imgclf.images import ImageLimits
from imgclf.inference._backends import Backend, OnnxBackend, TorchBackend, TorchScriptBackend
from imgclf.modelfile import ModelKind, identify
from imgclf.presets import Preprocessing, eval_transform

__all__ = ["BACKENDS", "PREDICT_LIMITS", "Backend", "Classifier", "load_classifier", "preprocess_pool"]

BACKENDS = ("auto", "torch", "onnx", "torchscript")
# Prediction accepts any size an image viewer would show; the bomb limit still applies.
PREDICT_LIMITS = ImageLimits(min_side=1)
_BACKEND_OF = {ModelKind.RUN: "torch", ModelKind.CHECKPOINT: "torch", ModelKind.ONNX: "onnx",
               ModelKind.TORCHSCRIPT: "torchscript"}


@dataclass
class Classifier:
    """A backend plus the class names and preprocessing that belong to it."""

    backend: Backend
    class_names: list[str]
    preprocessing: Preprocessing
    source: str  # the model path, for logs and /health
    transform: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.preprocessing)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def probabilities(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self.backend.probabilities(torch.stack(tensors))

    def top_k(self, probs: np.ndarray, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(self.class_names)))]
        return [(self.class_names[i], float(probs[i])) for i in order]


def _chosen_backend(path: Path, kind: ModelKind, backend: str) -> str:
    natural = _BACKEND_OF[kind]
    if backend in ("auto", natural):
        return natural
    hint = "; export it first: imgclf export " + str(path) if natural == "torch" else ""
    raise ConfigError(f"--backend {backend}: {path} is a {kind.value}, which runs with --backend {natural}{hint}")


def load_classifier(model_path: str | Path, backend: str = "auto") -> Classifier:
    """Open a run directory, checkpoint, .onnx or TorchScript file as a Classifier."""
    path = Path(model_path)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    kind = identify(path)
    chosen = _chosen_backend(path, kind, backend)
    if chosen == "onnx":
        from imgclf.modelfile import read_onnx_metadata

        meta = read_onnx_metadata(path)
        return Classifier(OnnxBackend(path), meta.class_names, meta.preprocessing, str(path))
    if chosen == "torchscript":
        from imgclf.modelfile import load_torchscript

        module, meta = load_torchscript(path)
        return Classifier(TorchScriptBackend(module), meta.class_names, meta.preprocessing, str(path))
    from imgclf.checkpoint import load_model

    loaded = load_model(path)
    return Classifier(TorchBackend(loaded.model), loaded.class_names, loaded.preprocessing, str(loaded.path))


def _single_threaded_torch() -> None:
    # Per thread (OpenMP semantics): preprocessing threads run torch ops on small images, where
    # intra-op threads only fight the model's own threads for the cores (measured: 5-10x slower).
    torch.set_num_threads(1)


def preprocess_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for reading, decoding and preprocessing, each with single-threaded torch ops."""
    return ThreadPoolExecutor(threads, thread_name_prefix="imgclf-prep", initializer=_single_threaded_torch)

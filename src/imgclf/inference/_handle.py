"""The one way to open a model file: `load(path, backend, device) -> ModelHandle` (core layer).

Every stage that opens a model (predict, serve, evaluate, export, audit, the API's `load`) calls
`load`; tests/test_layout.py checks that nothing else calls the openers below. `modelfile.identify`
says what kind of file a path is (by content); the kind names its natural backend, and the
backend's opener reads the file once and returns the handle: class names, preprocessing, arch,
the training config (torch files), the metadata dict as stored (`meta`, passed through whole, so a
field added to checkpoints or exported files reaches every stage without an edit here), the
device, the backend that turns a normalised batch into probabilities, and the torch module where
there is one (export traces it, audit takes its penultimate layer, evaluate runs it on a device).

A new backend is one entry in `OPENERS` (and, for a new kind of file, one line in `NATURAL`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError
from imgclf.inference._backends import Backend, OnnxBackend, TorchBackend, TorchScriptBackend
from imgclf.modelfile import ModelKind, identify
from imgclf.presets import Preprocessing

if TYPE_CHECKING:
    from torch import nn

    from imgclf.config import TrainConfig

__all__ = ["BACKENDS", "NATURAL", "OPENERS", "ModelHandle", "load"]


@dataclass(frozen=True)
class ModelHandle:
    """An opened model, whatever file it came from."""

    path: Path  # the file read: a run directory's checkpoint, or the exported file
    kind: ModelKind
    backend: Backend  # normalised float batch (N, 3, H, W) -> probabilities (N, C)
    class_names: list[str]
    preprocessing: Preprocessing
    arch: str
    meta: dict[str, Any]  # the metadata stored with the model, as stored (checkpoint "imgclf", export JSON)
    device: str = "cpu"
    config: TrainConfig | None = None  # the training config (checkpoints only)
    module: nn.Module | None = field(default=None, repr=False)  # the torch model (checkpoints only), on device

    @property
    def exported(self) -> bool:
        return self.module is None

    @property
    def task(self) -> str:
        """"single_label" (the default, no key stored) or "multilabel", as the stored metadata says."""
        return str(self.meta.get("task", "single_label"))

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label model's per-class thresholds, from the stored metadata (checked when it was read)."""
        values = self.meta.get("thresholds") if self.task == "multilabel" else None
        return [float(v) for v in values] if values is not None else None


def _open_torch(path: Path, kind: ModelKind, device: str) -> ModelHandle:
    from imgclf.checkpoint import load_model

    loaded = load_model(path)
    module = loaded.model if device == "cpu" else loaded.model.to(device).eval()
    # An exported file holds its own activation; a checkpoint's logits get sigmoid when multi-label.
    backend = TorchBackend(module, device, sigmoid=loaded.thresholds is not None)
    return ModelHandle(loaded.path, kind, backend, loaded.class_names, loaded.preprocessing,
                       loaded.config.model.arch, loaded.meta, device, loaded.config, module)


def _open_onnx(path: Path, kind: ModelKind, device: str) -> ModelHandle:
    from imgclf.modelfile import onnx_metadata

    # The session holds the metadata too: no second parse of the file, no `onnx` import.
    session = OnnxBackend(path)
    meta = onnx_metadata(session.metadata(), path)
    return ModelHandle(path, kind, session, meta.class_names, meta.preprocessing, meta.arch, meta.plain, device)


def _open_torchscript(path: Path, kind: ModelKind, device: str) -> ModelHandle:
    from imgclf.modelfile import load_torchscript

    module, meta = load_torchscript(path)
    return ModelHandle(path, kind, TorchScriptBackend(module), meta.class_names, meta.preprocessing, meta.arch,
                       meta.plain, device)


# backend name -> opener(path, kind, device). A new backend is one entry here.
OPENERS: dict[str, Callable[[Path, ModelKind, str], ModelHandle]] = {
    "torch": _open_torch, "onnx": _open_onnx, "torchscript": _open_torchscript,
}
# The backend each kind of file runs with; only checkpoints choose a device.
NATURAL = {ModelKind.RUN: "torch", ModelKind.CHECKPOINT: "torch", ModelKind.ONNX: "onnx",
           ModelKind.TORCHSCRIPT: "torchscript"}
BACKENDS = ("auto", *OPENERS)


def _chosen_backend(path: Path, kind: ModelKind, backend: str) -> str:
    natural = NATURAL[kind]
    if backend in ("auto", natural):
        return natural
    hint = "; export it first: imgclf export --model " + str(path) if natural == "torch" else ""
    raise ConfigError(f"--backend {backend}: {path} is a {kind.value}, which runs with --backend {natural}{hint}")


def _device(name: str, path: Path, kind: ModelKind) -> str:
    """The device a torch model runs on: 'auto' is cuda when available; exported files run on CPU."""
    if NATURAL[kind] != "torch":
        if name not in ("auto", "cpu"):
            raise ConfigError(f"--device {name}: {path} is an exported {kind.value} file, which runs on its "
                              "own backend; evaluate the run directory or checkpoint to choose a device")
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: no such CUDA device here "
                          f"({torch.cuda.device_count()} visible); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")
    return str(device)


def load(model_path: str | Path, backend: str = "auto", device: str = "cpu") -> ModelHandle:
    """Open a run directory, checkpoint, .onnx or TorchScript file (DataError/ConfigError: one line)."""
    path = Path(model_path)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    kind = identify(path)
    chosen = _chosen_backend(path, kind, backend)
    return OPENERS[chosen](path, kind, _device(device, path, kind))

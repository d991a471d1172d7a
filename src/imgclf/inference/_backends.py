"""Inference backends: a normalised float batch (N, 3, H, W) in, class probabilities (N, C) out.

A batch is a numpy array or a torch tensor (anything `np.asarray`/`torch.as_tensor` takes).
torch is imported by the torch backends only: an ONNX model runs with onnxruntime and numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from imgclf.errors import DataError

if TYPE_CHECKING:
    import torch


class Backend(Protocol):
    name: str

    def probabilities(self, batch: Any) -> np.ndarray: ...


class _TorchThreads:
    """Runs the model with the intra-op thread count of the thread that loaded it, whatever thread calls.

    torch.set_num_threads also sets the default of threads that have not run a torch op yet, so
    after the single-threaded preprocessing threads start, a fresh thread (serve's model thread)
    would run the model on one thread. Measured: serve's model thread ran single-threaded before.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.threads = torch.get_num_threads()

    def ensure(self) -> None:
        if self._torch.get_num_threads() != self.threads:
            self._torch.set_num_threads(self.threads)


class _TorchModel:
    """What the torch backends share: the model's intra-op thread count, settable (serve sets it)."""

    _threads: _TorchThreads

    def set_threads(self, threads: int) -> None:
        self._threads.threads = max(1, threads)


class TorchBackend(_TorchModel):
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "cpu", sigmoid: bool = False) -> None:
        self.model = model.eval()
        self.device = device  # where the model's weights are (inference.load moved them)
        self.sigmoid = sigmoid  # a multi-label model: one independent probability per label
        self._threads = _TorchThreads()

    def probabilities(self, batch: Any) -> np.ndarray:
        import torch

        from imgclf.models import fast_layout

        self._threads.ensure()
        with torch.inference_mode():
            inputs = torch.as_tensor(batch)
            if self.device != "cpu":
                inputs = inputs.to(self.device, non_blocking=True)
            logits = self.model(fast_layout(inputs))
            return (torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=1)).cpu().numpy()


class TorchScriptBackend(_TorchModel):
    name = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self._threads = _TorchThreads()

    def probabilities(self, batch: Any) -> np.ndarray:
        import torch

        self._threads.ensure()
        with torch.inference_mode():
            return self.module(torch.as_tensor(batch))[1].numpy()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        # Idle intra-op threads spin (busy-wait) by default, taking the cores that read and decode
        # the next batch; they sleep instead, so decoding and inference share the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a file that is not ONNX
            raise DataError(f"{path}: not a readable ONNX file ({err.__class__.__name__})") from None

    def metadata(self) -> dict[str, str]:
        """The file's metadata_props (where `imgclf export` stores class names and preprocessing)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def probabilities(self, batch: Any) -> np.ndarray:
        inputs = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(["probabilities"], {"input": inputs})[0]

"""Inference backends: a normalised float batch (N, 3, H, W) in, class probabilities (N, C) out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from imgclf.models import fast_layout


class Backend(Protocol):
    name: str

    def probabilities(self, batch: torch.Tensor) -> np.ndarray: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.model(fast_layout(batch)), dim=1).numpy()


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(batch)[1].numpy()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(["probabilities"], {"input": batch.numpy()})[0]

"""Test-time augmentation: class probabilities averaged over a few views of each image (core layer).

Wraps any "normalised batch (N, 3, H, W) -> probabilities (N, C)" function: a Classifier's
backend (predict, serve, the API) or evaluate's model. The views are made on the batch the
eval preprocessing produced, so every backend gets them (ONNX included, without torch):

    none    1 pass: the image as preprocessed
    flip    2 passes: the image and its mirror image (left-right)
    crops   10 passes: the two above, and four crops shifted by 1/16 of the side towards each
            corner (the border filled by reflection, so the size stays), each also mirrored

Probabilities are averaged (not logits), so the result is still a distribution. Exports stay
single-pass models; TTA is an option of evaluate and predict (`--tta`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from imgclf.errors import ConfigError

TTA_MODES = ("none", "flip", "crops")
PASSES = {"none": 1, "flip": 2, "crops": 10}


def check_mode(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta: unknown mode {mode!r} (choose from {', '.join(TTA_MODES)})")
    return mode


def _mirror(batch: Any) -> Any:
    if isinstance(batch, np.ndarray):
        return np.ascontiguousarray(batch[..., ::-1])
    return batch.flip(-1)


def _shifted(batch: Any, dy: int, dx: int, pad: int) -> Any:
    """The batch moved by (dy, dx) pixels within a `pad`-pixel reflected border (same size)."""
    h, w = batch.shape[-2:]
    top, left = pad + dy, pad + dx
    if isinstance(batch, np.ndarray):
        padded = np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        return np.ascontiguousarray(padded[..., top:top + h, left:left + w])
    import torch.nn.functional as F

    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    return padded[..., top:top + h, left:left + w].contiguous()


def views(batch: Any, mode: str) -> list[Any]:
    """The batches a TTA mode runs the model on (numpy arrays or torch tensors, as given)."""
    check_mode(mode)
    if mode == "none":
        return [batch]
    out = [batch, _mirror(batch)]
    if mode == "crops":
        pad = max(1, min(batch.shape[-2:]) // 16)
        for dy, dx in ((-pad, -pad), (-pad, pad), (pad, -pad), (pad, pad)):
            shifted = _shifted(batch, dy, dx, pad)
            out += [shifted, _mirror(shifted)]
    return out


def probabilities(predict: Callable[[Any], np.ndarray], batch: Any, mode: str) -> np.ndarray:
    """Mean of predict(view) over the mode's views; exactly predict(batch) for "none"."""
    passes = views(batch, mode)
    total = predict(passes[0])
    for view in passes[1:]:
        total = total + predict(view)
    return total / len(passes) if len(passes) > 1 else total


def wrap(predict: Callable[[Any], np.ndarray], mode: str) -> Callable[[Any], np.ndarray]:
    """`predict` with TTA applied (itself for "none")."""
    if check_mode(mode) == "none":
        return predict
    return lambda batch: probabilities(predict, batch, mode)

"""Decoded images -> the model's normalised float batch, a whole batch at a time (core layer).

`presets.eval_transform` defines eval preprocessing: resize the shorter side to
`resize_size`, centre-crop `image_size`, scale to [0, 1], subtract the mean, divide by
the std. Applied one image at a time it costs more than the network (torchvision's
transform machinery, about 0.4 ms an image). This module applies the same steps to a batch:

- resize + crop, two interchangeable ways:
  `TorchResize` runs torchvision's own resize kernel (the one eval_transform calls) once
  per group of same-size images: bitwise equal to eval_transform.
  `PillowResize` runs Pillow's resampler, for ONNX inference without torch: it differs from
  torchvision's kernel by at most 1 level in 255 on a few values in ten thousand
  (tests/test_inference.py measures it; docs/ship.md states the tolerance).
- scale + normalise: eval_transform's own float32 operations in the same order, in place on
  the whole batch. Normalising is elementwise, so checking all 256 levels of each channel
  (`normalize_table`, tests/test_inference.py) proves it bitwise equal for every image.

Both take RGB or 8-bit grey ("L") PIL images (as `images.decode_image` returns them, the latter
with `keep_grey`) and return a contiguous float32 array (N, 3, image_size, image_size): a grey
image is resized once and its channel repeated, which is bitwise what resizing its RGB
conversion gives (each channel is resized alike; tests/test_inference.py checks it) at a third
of the work. torch is imported by `TorchResize` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from imgclf.images import check_resize
from imgclf.presets import ImageTooLarge, Preprocessing

__all__ = ["PillowResize", "Preprocessor", "Resizer", "TorchResize", "normalize", "normalize_table",
           "resized_size", "torch_free"]


class Resizer(Protocol):
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> uint8 (N, image_size, image_size, 3), resized and centre-cropped."""
        ...


def resized_size(pre: Preprocessing, width: int, height: int) -> tuple[int, int]:
    """(width, height) after the shorter side is resized to resize_size, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(pre.resize_size * long / short)  # torchvision truncates, it does not round
    return (pre.resize_size, new_long) if width <= height else (new_long, pre.resize_size)


def _crop_origin(size: int, crop: int) -> int:
    return int(round((size - crop) / 2.0))  # torchvision's centre-crop anchor, Python rounding included


def torch_free(pre: Preprocessing) -> bool:
    """Whether PillowResize covers this preprocessing (bilinear, and no padding in the centre crop)."""
    return pre.interpolation == "bilinear" and pre.resize_size >= pre.image_size


class PillowResize:
    """Resize and crop with Pillow, no torch: within 1 level of torchvision's uint8 kernel."""

    def __init__(self, pre: Preprocessing) -> None:
        if not torch_free(pre):
            raise ValueError(f"PillowResize covers bilinear resizing to at least the crop size, not {pre}")
        self.pre = pre

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        crop = self.pre.image_size
        out = np.empty((len(images), crop, crop, 3), np.uint8)
        for i, image in enumerate(images):
            width, height = resized_size(self.pre, *image.size)
            left, top = _crop_origin(width, crop), _crop_origin(height, crop)
            # Pillow's resize releases the GIL; reducing_gap=None (the default) keeps the exact filter.
            resized = image.resize((width, height), Image.Resampling.BILINEAR)
            if (width, height) != (crop, crop):  # resized to the crop already: no copy to make
                resized = resized.crop((left, top, left + crop, top + crop))
            pixels = np.asarray(resized)
            out[i] = pixels[..., None] if pixels.ndim == 2 else pixels  # grey: the channel, three times
        return out


class TorchResize:
    """torchvision's resize kernel and centre crop, one call per group of same-size images.

    eval_transform on one image = ToImage, Resize(resize_size, interpolation, antialias=True),
    CenterCrop(image_size); the functional kernels below are what those transforms dispatch to,
    on a batch instead of one image (the kernel computes every image independently).
    """

    def __init__(self, pre: Preprocessing) -> None:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        self.pre = pre
        self._torch, self._F = torch, F
        self._mode = InterpolationMode(pre.interpolation)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        crop = self.pre.image_size
        out = np.empty((len(images), crop, crop, 3), np.uint8)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.size, []).append(i)
        for indices in groups.values():
            # (N, H, W, 3) viewed as (N, 3, H, W): channels_last, the layout the uint8 kernel prefers.
            stacked = np.stack([_rgb_pixels(images[i]) for i in indices])
            batch = self._torch.from_numpy(stacked).permute(0, 3, 1, 2)
            batch = self._F.resize_image(batch, [self.pre.resize_size], self._mode, antialias=True)
            batch = self._F.center_crop_image(batch, [crop, crop])
            out[indices] = batch.permute(0, 2, 3, 1).numpy()
        return out


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    # torchvision's kernel takes 3 channels; a grey image becomes what its RGB conversion would be.
    pixels = np.asarray(image)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def normalize(crops: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S), as eval_transform's ToDtype(scale=True) + Normalize.

    The same float32 operations in the same order: x * float32(1/255), then - mean, then / std
    (torchvision multiplies by the scalar 1/255 in float32 and subtracts/divides by float32
    tensors), so the result is bitwise eval_transform's.
    """
    out = np.empty((crops.shape[0], 3, crops.shape[1], crops.shape[2]), np.float32)
    out[...] = crops.transpose(0, 3, 1, 2)
    np.multiply(out, np.float32(1.0 / 255), out=out)
    np.subtract(out, np.asarray(pre.mean, np.float32)[:, None, None], out=out)
    np.divide(out, np.asarray(pre.std, np.float32)[:, None, None], out=out)
    return out


def normalize_table(pre: Preprocessing) -> np.ndarray:
    """(3, 256) float32: every uint8 level of every channel through `normalize` (what the test checks)."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 1, 256, 3))
    return normalize(np.ascontiguousarray(levels), pre)[0, :, 0, :]


def _check(image: Image.Image, pre: Preprocessing) -> None:
    # Callers decode with images.decode_image, which already refused oversized resizes from the
    # header (ImageLimits.for_resize); this second line covers images handed in directly.
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"expected an RGB or L image (as images.decode_image returns), got mode {image.mode}")
    refused = check_resize(*image.size, pre.resize_size)
    if refused is not None:
        raise ImageTooLarge(f"{refused.status}: {refused.reason}")


class Preprocessor:
    """Decoded RGB images -> float32 (N, 3, S, S): a Resizer, then `normalize`."""

    def __init__(self, pre: Preprocessing, resize: Resizer) -> None:
        self.pre, self.resize = pre, resize

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        for image in images:
            _check(image, self.pre)
        return normalize(self.resize(images), self.pre)

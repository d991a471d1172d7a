"""Train and eval preprocessing, side by side, defined once.

`Preprocessing` is plain data stored in every checkpoint; `eval_transform` is what
evaluate, predict, export and serve all use, so inference can never drift from training.
torch and torchvision are imported inside the transform builders only: reading the
preprocessing of an exported ONNX model must not cost a torch import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from imgclf.config import AugmentConfig, DataConfig

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        return cls(
            image_size=data.image_size,
            resize_size=max(data.image_size, round(data.image_size / data.crop_ratio)),
            mean=tuple(data.mean),
            std=tuple(data.std),
            interpolation=data.interpolation,
        )

    def to_plain(self) -> dict[str, Any]:
        plain = asdict(self)
        plain["mean"], plain["std"] = list(self.mean), list(self.std)
        return plain

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(plain["image_size"]),
            resize_size=int(plain["resize_size"]),
            mean=tuple(float(v) for v in plain["mean"]),
            std=tuple(float(v) for v in plain["std"]),
            interpolation=str(plain.get("interpolation", "bilinear")),
        )


def _interp(pre: Preprocessing) -> InterpolationMode:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(pre.interpolation)


def _to_float_normalized(pre: Preprocessing) -> list[Any]:
    import torch
    from torchvision.transforms import v2 as T

    return [T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


class ImageTooLarge(ValueError):
    """Resizing this image would allocate more than images.ImageLimits allows."""


class ResizeGuard:
    """First step of the eval resize: refuse, before any allocation, an image whose resize to
    `short_side` would be huge (a 1 x 200,000 strip becomes 73 x 14,600,000). The same rule as
    `images.check_resize`, so a caller that skipped the decode-time check is still bounded."""

    def __init__(self, short_side: int) -> None:
        self.short_side = short_side

    def __call__(self, image: Any) -> Any:
        from imgclf.images import check_resize

        width, height = image.size if hasattr(image, "getbands") else (image.shape[-1], image.shape[-2])
        refused = check_resize(int(width), int(height), self.short_side)
        if refused is not None:
            raise ImageTooLarge(f"{refused.status}: {refused.reason}")
        return image


def eval_resize(pre: Preprocessing) -> T.Compose:
    """PIL/uint8 -> uint8 tensor of shape (3, image_size, image_size): resize, centre crop."""
    from torchvision.transforms import v2 as T

    return T.Compose([
        ResizeGuard(pre.resize_size),
        T.ToImage(),
        T.Resize(pre.resize_size, interpolation=_interp(pre), antialias=True),
        T.CenterCrop(pre.image_size),
    ])


def normalize(pre: Preprocessing) -> T.Compose:
    """uint8 tensor -> normalised float tensor (works on single images and batches)."""
    from torchvision.transforms import v2 as T

    return T.Compose(_to_float_normalized(pre))


def eval_transform(pre: Preprocessing) -> T.Compose:
    """PIL image -> normalised float tensor, exactly as the model saw validation data."""
    from torchvision.transforms import v2 as T

    return T.Compose([eval_resize(pre), normalize(pre)])


def train_augment(pre: Preprocessing, augment: AugmentConfig) -> T.Compose:
    """PIL image or uint8 tensor -> augmented uint8 tensor (3, image_size, image_size).

    Training keeps images uint8 until they reach the model (`normalize` runs on the batch),
    so DataLoader workers pass a quarter of the bytes that float tensors would need.
    """
    from torchvision.transforms import v2 as T

    steps: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(pre.image_size, scale=tuple(augment.crop_scale),
                            interpolation=_interp(pre), antialias=True),
    ]
    if augment.hflip is True:  # "alternate" mirrors by epoch, in train/_tricks.py's sampler
        steps.append(T.RandomHorizontalFlip())
    if augment.policy == "randaugment":
        steps.append(T.RandAugment(interpolation=_interp(pre)))
    elif augment.policy == "trivialaugment":
        steps.append(T.TrivialAugmentWide(interpolation=_interp(pre)))
    if augment.random_erasing > 0:
        # On uint8, erased patches are black; on the normalised batch they would be the mean colour.
        steps.append(T.RandomErasing(p=augment.random_erasing, value=0))
    return T.Compose(steps)


def train_transform(pre: Preprocessing, augment: AugmentConfig) -> T.Compose:
    """PIL image or uint8 tensor -> augmented, normalised float tensor."""
    from torchvision.transforms import v2 as T

    return T.Compose([train_augment(pre, augment), normalize(pre)])

"""Tricks of the training-speed records (airbench, hlb-CIFAR10) as config options.

Each is off by default and measured alone and together in benchmarks/fashion_mnist_tricks.py
(figures in docs/benchmarks.md, issue 23):

    data.augment.hflip: alternate     every image is mirrored in every other epoch (airbench's
                                      "alternating flip"), instead of a coin flip each time it is seen
    data.augment.progressive_min_size training batches start smaller and grow to image_size
    model.stem_init: identity|whiten  the first convolution starts as an identity (Dirac) or as a
                                      PCA whitening of the training images' patches

Lookahead and Nesterov momentum live in `_optim`; label smoothing, translate + mirror TTA
(`--tta crops`) and channels_last were options before. Private to the train stage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, RandomSampler, Sampler

from imgclf.config import AugmentConfig, TrainConfig
from imgclf.errors import ConfigError

log = logging.getLogger("imgclf.train")

# Patches (images x positions) the whitening covariance is estimated from: plenty for 27 dimensions.
WHITEN_IMAGES = 512
WHITEN_EPS = 5e-4  # airbench's: keeps directions of (near) zero variance finite (greyscale read as RGB)
SIZE_STEP = 4  # progressive sizes are multiples of this: a few distinct shapes, not one per step


# ---- alternating flip ---------------------------------------------------------------------------
class AlternatingFlipSampler(Sampler):
    """Yields (index, mirror?) pairs: a random order each epoch, and for image i a mirror flag that is
    a seeded coin flip in the first epoch and alternates after it.

    A random flip shows an image the same way twice in a row half of the time; alternating shows
    both orientations in every pair of epochs, which airbench found worth ~a tenth of its epochs.
    The sampler counts the epochs itself (each `iter` is one), so the flag is decided in the main
    process and DataLoader workers need no epoch number.
    """

    def __init__(self, size: int, seed: int, order: Sampler | None = None) -> None:
        self.size = size
        generator = torch.Generator().manual_seed(seed)
        self.first = torch.rand(size, generator=generator) < 0.5
        self.order = order if order is not None else RandomSampler(range(size), generator=generator)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.order)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        odd = self.epoch % 2 == 1
        self.epoch += 1
        for i in self.order:
            yield int(i), bool(self.first[int(i)]) ^ odd


class FlipKeyedImages(Dataset):
    """The training images, indexed by `AlternatingFlipSampler`'s (index, mirror?) pairs.

    A plain int index reads the image unmirrored (the batch preview, the whitening sample); every
    other attribute (failures, cache, with_transform) is the wrapped dataset's.
    """

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if "images" not in self.__dict__:  # while unpickling in a DataLoader worker
            raise AttributeError(name)
        return getattr(self.__dict__["images"], name)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, Any]:
        index, mirror = key if isinstance(key, tuple) else (key, False)
        image, target = self.images[index]
        return (image.flip(-1) if mirror else image), target


def alternating_flip(images: Dataset, sampler: Sampler | None, seed: int) -> tuple[Dataset, Sampler]:
    """The (dataset, sampler) pair for data.augment.hflip: alternate (the sampler replaces shuffle=True)."""
    return FlipKeyedImages(images), AlternatingFlipSampler(len(images), seed, sampler)  # type: ignore[arg-type]


# ---- progressive resizing -----------------------------------------------------------------------
def progressive_size(augment: AugmentConfig, full: int, done: float) -> int:
    """The training image side after `done` (0..1) of training: min_size growing linearly to `full` by
    progressive_until, in steps of SIZE_STEP pixels; `full` when progressive resizing is off."""
    start = augment.progressive_min_size
    if start is None or start >= full:
        return full
    frac = min(1.0, done / augment.progressive_until) if augment.progressive_until > 0 else 1.0
    size = start + (full - start) * frac
    return min(full, max(start, int(size // SIZE_STEP) * SIZE_STEP))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """The (normalised) batch scaled to size x size; unchanged at its own size. Antialiased: a smaller
    image, not a subsampled one, as a downscaled photo would be."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---- first-layer initialisation -----------------------------------------------------------------
def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first layer when it is a dense Conv2d on the image (CNN stems; not depthwise ones)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1 or conv.in_channels != 3:
        raise ConfigError("model.stem_init: the model's first layer is no dense 3-channel Conv2d "
                          f"({type(conv).__name__ if conv is not None else 'no Conv2d at all'}); use default")
    return conv


@torch.no_grad()
def identity_init(conv: nn.Conv2d) -> None:
    """The first in_channels filters pass the input channels through (a Dirac kernel); the others keep
    their random init. The net starts by seeing the image itself in its first channels."""
    weight = conv.weight
    if weight.shape[-1] % 2 == 0 or weight.shape[-2] % 2 == 0:
        raise ConfigError(f"model.stem_init=identity: the first conv's {tuple(weight.shape[-2:])} kernel has no centre")
    nn.init.dirac_(weight[: conv.in_channels])
    if conv.bias is not None:
        conv.bias[: conv.in_channels].zero_()


@torch.no_grad()
def whitening_init(conv: nn.Conv2d, images: torch.Tensor) -> int:
    """Filters = the principal directions of the images' kernel-sized patches, scaled by 1/sqrt(variance),
    each followed by its negative (airbench's whitening layer, here trainable). The strongest come first;
    filters beyond 2 x patch dimensions keep their random init. Returns how many were set.

    `images`: a normalised (N, 3, H, W) float batch of training images.
    """
    kh, kw = conv.kernel_size
    patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, conv.in_channels * kh * kw)
    covariance = flat.T @ flat / len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    order = eigenvalues.flip(0)
    filters = eigenvectors.T.flip(0) / torch.sqrt(order.clamp(min=0) + WHITEN_EPS)[:, None]
    both = torch.cat([filters, -filters])[: conv.out_channels]
    conv.weight[: len(both)] = both.reshape(len(both), conv.in_channels, kh, kw).to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias[: len(both)].zero_()
    return len(both)


def init_stem(model: nn.Module, config: TrainConfig, sample: Any) -> None:
    """model.stem_init at the start of a fresh run; `sample()` gives normalised training images (whiten)."""
    mode = config.model.stem_init
    if mode == "default":
        return
    conv = first_conv(model)
    if mode == "identity":
        identity_init(conv)
        log.info("stem_init identity: %d of %d first-layer filters pass the image through", conv.in_channels,
                 conv.out_channels)
        return
    count = whitening_init(conv, sample())
    log.info("stem_init whiten: %d of %d first-layer filters whiten %dx%d patches", count, conv.out_channels,
             *conv.kernel_size)


def whitening_sample(dataset: Dataset, normalize: Any, seed: int, device: torch.device) -> torch.Tensor:
    """Up to WHITEN_IMAGES seeded training images (augmented as in training), normalised, as one batch."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=generator)[:WHITEN_IMAGES].tolist()  # type: ignore[arg-type]
    batch = torch.stack([dataset[i][0] for i in picks]).to(device)
    return normalize(batch)

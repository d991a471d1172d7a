"""MixUp / CutMix on the training batch, and the cross-entropy that takes their soft targets.

The mixing itself is torchvision's (`transforms.v2.MixUp`, `CutMix`, `RandomChoice`,
`RandomApply`), run on the normalised float batch on the training device. It returns mixed
one-hot targets (N, K); `cross_entropy` turns them into a loss with the run's label smoothing
and class weights. Validation never mixes: accuracy, F1 and the collapse check see hard labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imgclf.config import AugmentConfig

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_mixer(augment: AugmentConfig, num_classes: int) -> Mixer | None:
    """(images, int labels) -> (mixed images, labels): soft (N, K) when mixed, else unchanged ints.

    None when neither data.augment.mixup nor data.augment.cutmix is on.
    """
    from torchvision.transforms import v2

    choices: list[nn.Module] = []
    if augment.mixup > 0:
        choices.append(v2.MixUp(alpha=augment.mixup, num_classes=num_classes))
    if augment.cutmix > 0:
        choices.append(v2.CutMix(alpha=augment.cutmix, num_classes=num_classes))
    if not choices or augment.mix_prob == 0:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return mix if augment.mix_prob >= 1 else v2.RandomApply([mix], p=augment.mix_prob)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for hard (N,) or soft (N, K) targets, with label smoothing and class weights.

    Hard targets: PyTorch's weighted mean (divided by the sum of the targets' weights).
    Soft targets: PyTorch applies smoothing and weights per class but divides by N; dividing by
    the targets' summed weights instead makes a one-hot soft target give exactly the hard loss,
    so turning mixing on does not rescale the loss (and the effective learning rate).
    """
    if targets.ndim == 1:
        return nn.functional.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    total = nn.functional.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing,
                                        reduction="sum")
    if weight is None:
        return total / len(targets)
    return total / (targets @ weight).sum()

"""task: multilabel in training: the loss (BCE, optionally with positive weights, or asymmetric
loss), the validation metrics that select the best checkpoint, and the per-label thresholds chosen on
the validation split after training and written into the checkpoints.

Validation metrics (logged under the single-label names, so trainer.monitor works unchanged):
val_f1_macro is the macro F1 at probability 0.5, val_accuracy the subset accuracy (every label of an
image right), val_map the mean average precision over labels with a positive in validation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader

from imgclf import multilabel
from imgclf._files import atomic_path
from imgclf.config import TrainConfig

log = logging.getLogger("imgclf.train")


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021, "Asymmetric Loss For Multi-Label Classification"):
    focal-style down-weighting with a stronger exponent for negatives, and negatives whose probability
    is below `clip` shifted to zero loss. Most tags are absent from most images; plain BCE spends its
    gradient on those easy negatives. Mean over the elements, like BCEWithLogitsLoss."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # probability shifting
        eps = 1e-8
        loss_pos = targets * torch.log(p.clamp(min=eps)) * (1 - p) ** self.gamma_pos
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps)) * p_neg ** self.gamma_neg
        return -(loss_pos + loss_neg).mean()


def pos_weight(targets: torch.Tensor) -> torch.Tensor:
    """negatives / positives per label over the train subset (loss.pos_weight: auto), capped at 100 so
    a label seen once does not dominate; 1 where a label has no positive."""
    positives = targets.sum(0)
    negatives = len(targets) - positives
    weight = (negatives / positives.clamp(min=1)).clamp(max=100.0)
    return torch.where(positives > 0, weight, torch.ones_like(weight))


def init_head(model: nn.Module, train_targets: torch.Tensor, seed: int) -> None:
    """A new head over pretrained features: small weights and each bias at its label's training prevalence.

    A fresh head's default init (timm's efficientnet: uniform +-1/sqrt(classes)) over 1280 pretrained
    features gives logits of +-10: every sigmoid saturates, BCE starts at 2.2-2.5 instead of ~0.69, and in
    a few hundred steps at the head's lr the model only learns each label's prevalence (measured:
    `benchmarks/multilabel.py --recipe finetune`, 240 composites, val mAP at the frequency baseline).
    The prior bias (Lin et al., focal loss, 2017) starts the loss at the labels' entropy instead."""
    # The layer that outputs the label scores: the last nn.Linear (as _transfer.final_linear finds it for
    # the probe; not imported from there, since _transfer imports the module that imports this one).
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    prevalence = train_targets.float().mean(dim=0).clamp(1e-3, 1 - 1e-3)
    generator = torch.Generator().manual_seed(seed)  # its own RNG: the run's random stream is untouched
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        if linear.bias is not None:
            linear.bias.copy_(torch.log(prevalence / (1 - prevalence)))
    log.info("head: new for %d labels, small weights (std 0.01), biases at the labels' training prevalence "
             "(%.2f-%.2f)", linear.out_features, float(prevalence.min()), float(prevalence.max()))


def make_criterion(config: TrainConfig, train_targets: torch.Tensor | None) -> nn.Module:
    loss = config.loss
    if loss.name == "asl":
        return AsymmetricLoss(loss.gamma_neg, loss.gamma_pos, loss.clip)
    weight = pos_weight(train_targets) if loss.pos_weight == "auto" and train_targets is not None else None
    if weight is not None:
        log.info("bce pos_weight (negatives/positives per label): min %.2f, max %.2f",
                 float(weight.min()), float(weight.max()))
    return nn.BCEWithLogitsLoss(pos_weight=weight)


class ValMetrics(nn.Module):
    """The validation metrics of a multi-label model, as torchmetrics (synced under DDP)."""

    def __init__(self, n_labels: int) -> None:
        super().__init__()
        self.loss = torchmetrics.MeanMetric()
        self.f1 = torchmetrics.classification.MultilabelF1Score(n_labels, average="macro", zero_division=0)
        self.exact = torchmetrics.classification.MultilabelExactMatch(n_labels)
        self.ap = torchmetrics.classification.MultilabelAveragePrecision(n_labels, average="none")
        # Per-label support (tp + fn): labels with no positive in validation are left out of mAP.
        self.stats = torchmetrics.classification.MultilabelStatScores(n_labels, average="none")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        ints = targets.long()
        probs = torch.sigmoid(logits.float())
        self.loss.update(nn.functional.binary_cross_entropy_with_logits(logits.float(), targets), weight=len(targets))
        self.f1.update(probs, ints)
        self.exact.update(probs, ints)
        self.ap.update(probs, ints)
        self.stats.update(probs, ints)

    def compute_and_reset(self) -> dict[str, float]:
        with warnings.catch_warnings():  # "no positive samples": such labels are left out of mAP below
            warnings.filterwarnings("ignore", message=".*No positive samples.*")
            ap = self.ap.compute()
        has_pos = self.stats.compute()[:, 4] > 0  # columns tp, fp, tn, fn, support
        stats = {
            "val_loss": float(self.loss.compute()),
            "val_accuracy": float(self.exact.compute()),
            "val_f1_macro": float(self.f1.compute()),
            "val_map": float(ap[has_pos].mean()) if bool(has_pos.any()) else float("nan"),
        }
        for metric in (self.loss, self.f1, self.exact, self.ap, self.stats):
            metric.reset()
        return stats


@torch.no_grad()
def validation_probs(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """sigmoid(logits) and targets of every validation image; `model` maps a uint8 batch to logits."""
    probs, targets = [], []
    for images, target in loader:
        logits = model(images.to(device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(target.numpy())
    return np.concatenate(probs), np.concatenate(targets)


def store_thresholds(thresholds: list[float], paths: list[Path]) -> None:
    """Write the chosen thresholds into each checkpoint's imgclf metadata (atomically)."""
    for path in paths:
        if not path.is_file():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["imgclf"]["thresholds"] = [float(t) for t in thresholds]
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)


def fit_thresholds(module: nn.Module, best: Path, val_loader: DataLoader, paths: list[Path]) -> list[float]:
    """Per-label thresholds that maximise each label's F1 on the validation split, with the best
    checkpoint's weights; stored in `paths` (best.ckpt, last.ckpt) and returned."""
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    net = module.model
    net.load_state_dict(weights)
    was_training = net.training
    net.eval()
    try:
        probs, targets = validation_probs(module, val_loader, next(net.parameters()).device)
    finally:
        net.train(was_training)
    thresholds = multilabel.choose_thresholds(probs, targets)
    store_thresholds(thresholds, paths)
    log.info("per-label thresholds chosen on %d validation images (max F1 each): %s", len(probs),
             ", ".join(f"{t:.2f}" for t in thresholds[:10]) + (", ..." if len(thresholds) > 10 else ""))
    return thresholds

"""Transfer learning: what is frozen and when, said in one log line; a backbone with no
pretrained weights is never frozen (its random features would only be fitted by the head).

Private to `train`: `freeze_plan` and `probe_head` are called once the model and its module exist.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf import models
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.train._module import ImageClassifier

log = logging.getLogger("imgclf.train")

# Inverse L2 strength of the probe: scikit-learn's default, the baseline benchmarks/transfer.py compares with.
PROBE_C = 1.0


def has_pretrained_backbone(config: TrainConfig) -> bool:
    return bool(config.model.pretrained or config.model.weights)


def freeze_plan(config: TrainConfig, model: nn.Module) -> int:
    """Epochs the backbone stays frozen, after one log line saying so (or a warning saying why not)."""
    epochs = config.model.freeze_backbone_epochs
    if epochs == 0:
        return 0
    if not has_pretrained_backbone(config):
        log.warning("model.freeze_backbone_epochs=%d ignored: the backbone has no pretrained weights "
                    "(model.pretrained=false, no model.weights), and a frozen random backbone leaves the head "
                    "nothing to learn from; every layer trains from epoch 1", epochs)
        return 0
    head = {id(p) for p in models.head_parameters(model)}
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in head)
    until = (f"every layer trains from epoch {epochs + 1}" if epochs < config.trainer.epochs
             else "for the whole run (head only)")
    log.info("backbone frozen in epochs 1-%d: %s of %s parameters (%d tensors), the head's %s train; %s",
             min(epochs, config.trainer.epochs), f"{frozen:,}", f"{total:,}", len(list(model.parameters())) -
             len(head), f"{total - frozen:,}", until)
    return epochs


def final_linear(model: nn.Module) -> nn.Linear:
    """The layer that outputs the class scores: the last nn.Linear of the model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("model.head_init=probe: the model has no linear classification layer")
    return linears[-1]


def probe_head(module: ImageClassifier, images: DataLoader, c: float = PROBE_C) -> float:
    """Set the new head to a logistic regression (scikit-learn, L2, lbfgs) fitted on the frozen backbone's
    features of `images` (the training images, eval preprocessing: no augmentation). Returns its
    training accuracy, after one log line.

    Why: a random head on a pretrained backbone learns slowly (timm's init gives logits of several
    units, a loss of 2x ln(classes)), and while it does, the gradients it sends back distort the
    pretrained features once they are unfrozen. Starting from the probe, fine-tuning has only
    to improve on the linear probe (Kumar et al. 2022, "LP-FT").
    """
    started = time.perf_counter()
    model = module.model
    linear = final_linear(model)
    captured: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    labels: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, targets in images:
                model(module._model_input(batch.to(linear.weight.device)))
                labels.append(targets)
    finally:
        hook.remove()
        model.train(was_training)
    features, y = torch.cat(captured).numpy(), torch.cat(labels).numpy()
    weight, bias, accuracy = _logistic(features, y, linear.out_features, c)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    log.info("head_init=probe: a logistic regression on %d frozen feature vectors (%d values each) starts the head "
             "(training accuracy %.3f, %.1fs)", len(y), features.shape[1], accuracy, time.perf_counter() - started)
    return accuracy


def _logistic(features: np.ndarray, y: np.ndarray, classes: int, c: float) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000).fit(features, y)
    weight = np.zeros((classes, features.shape[1]), np.float32)
    bias = np.zeros(classes, np.float32)
    present = clf.classes_.astype(int)
    if len(present) == 2:  # scikit-learn's binary model is one score: split it evenly between the two rows
        weight[present] = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
        bias[present] = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    else:
        weight[present], bias[present] = clf.coef_, clf.intercept_
    if len(present) < classes:  # a class with no training image: never the most likely one
        bias[np.setdiff1d(np.arange(classes), present)] = bias[present].min() - 10.0
    return weight, bias, float(clf.score(features, y))

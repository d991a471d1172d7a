"""Transfer learning: what is frozen and when, said in one log line; a backbone with no
pretrained weights is never frozen (its random features would only be fitted by the head).

Private to `train`: `freeze_plan` is called once the model and its module exist.
"""

from __future__ import annotations

import logging

from torch import nn

from imgclf import models
from imgclf.config import TrainConfig

log = logging.getLogger("imgclf.train")


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

"""The optimizer of a run: AdamW or SGD (Nesterov momentum by default), optionally inside Lookahead.

Lookahead (Zhang et al. 2019; used by hlb-CIFAR10 and airbench as an EMA of the weights):
every `optim.lookahead_steps` steps the weights move back halfway to where they were k steps
before. timm's implementation (`timm.optim.Lookahead`) shares its param_groups with the inner
optimizer, so the LR schedule and checkpoints work unchanged; it takes its first slow copy at
step k, so the first pull back is at step 2k. Private to the train stage.
"""

from __future__ import annotations

from typing import Any

import torch

from imgclf.config import OptimConfig
from imgclf.errors import MissingExtra

LOOKAHEAD_ALPHA = 0.5  # the paper's and timm's default: the slow weights move halfway


def make_optimizer(groups: list[dict[str, Any]], lr: float, opt: OptimConfig,
                   fused: bool | None) -> torch.optim.Optimizer:
    if opt.name == "sgd":
        # Not fused: torch 2.14's fused SGD fails on a first step where frozen parameters have no gradient.
        # Nesterov needs momentum (torch refuses it at 0).
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=opt.momentum,
                                                           nesterov=opt.nesterov and opt.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
    return with_lookahead(optimizer, opt.lookahead_steps)


def with_lookahead(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.Optimizer:
    """`optimizer` inside Lookahead with k = steps; itself when steps is 0."""
    if steps == 0:
        return optimizer
    try:
        from timm.optim import Lookahead
    except ImportError:
        raise MissingExtra("optim.lookahead_steps needs timm's Lookahead: pip install 'imgclf[timm]'") from None
    return Lookahead(optimizer, alpha=LOOKAHEAD_ALPHA, k=steps)

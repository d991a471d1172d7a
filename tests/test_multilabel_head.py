"""A new multi-label head over pretrained features starts at the labels' prevalence, not saturated."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgclf.train._multilabel import init_head


def test_init_head_starts_the_loss_at_the_labels_entropy_instead_of_saturated_sigmoids() -> None:
    torch.manual_seed(0)
    features = torch.randn(64, 1280).abs() * 3  # pretrained features are large and positive after pooling
    head = nn.Linear(1280, 4)
    nn.init.uniform_(head.weight, -0.5, 0.5)  # timm's efficientnet head init: +-1/sqrt(classes)
    model = nn.Sequential(nn.Identity(), head)
    targets = (torch.rand(64, 4) < torch.tensor([0.1, 0.3, 0.5, 0.8])).float()
    loss = nn.BCEWithLogitsLoss()
    with torch.no_grad():
        saturated = float(loss(model(features), targets))
    rng_before = torch.get_rng_state()

    init_head(model, targets, seed=7)

    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's random stream is untouched
    prevalence = targets.mean(dim=0)
    assert torch.allclose(torch.sigmoid(head.bias), prevalence.clamp(1e-3, 1 - 1e-3), atol=1e-6)
    assert float(head.weight.detach().std()) < 0.02
    entropy = float(-(prevalence * prevalence.log() + (1 - prevalence) * (1 - prevalence).log()).mean())
    with torch.no_grad():
        started = float(loss(model(features), targets))
    assert saturated > 2.0 and abs(started - entropy) < 0.1, (saturated, started, entropy)
    assert started < math.log(2) + 0.05

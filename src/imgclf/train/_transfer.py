"""Transfer learning: what is frozen and when, said in one log line; a backbone with no
pretrained weights is never frozen (its random features would only be fitted by the head).

Private to `train`: `freeze_plan` and `probe_head` are called once the model and its module exist; the
probe itself and `model.keep=better` live in `_probe`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf import models, presets
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.train import _probe
from imgclf.train._module import ImageClassifier
from imgclf.train._probe import ProbeFit

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


def start_probe(config: TrainConfig, module: ImageClassifier, train_loader: DataLoader,
                resume: bool) -> tuple[dict[str, torch.Tensor], ProbeFit] | None:
    """The linear probe, for head_init=probe (the head starts as it) and keep=better (the candidate the
    fine-tuned model is compared with; on resume the model still holds the pretrained weights here)."""
    wanted = [key for key, on in (("head_init=probe", config.model.head_init == "probe"),
                                  ("keep=better", config.model.keep == "better")) if on]
    if not wanted or (resume and config.model.keep != "better"):
        return None
    if not has_pretrained_backbone(config):
        raise ConfigError(f"model.{wanted[0]} needs a pretrained backbone (model.pretrained=true or "
                          "model.weights=PATH): a probe on random features is no start")
    images = train_loader.dataset.with_transform(presets.eval_resize(module.pre))
    fit, state = probe_head(module, DataLoader(images, batch_size=config.trainer.batch_size * 2,
                                               num_workers=config.data.num_workers),
                            apply=config.model.head_init == "probe" and not resume, seed=config.seed)
    return state, fit


def final_linear(model: nn.Module) -> nn.Linear:
    """The layer that outputs the class scores: the last nn.Linear of the model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("model.head_init=probe: the model has no linear classification layer")
    return linears[-1]


def probe_head(module: ImageClassifier, images: DataLoader, apply: bool = True, seed: int = 0,
               ) -> tuple[ProbeFit, dict[str, torch.Tensor]]:
    """A linear probe (`_probe.fit_probe`: logistic regression, C by cross-validation) on the frozen backbone's
    features of `images` (the training images, eval preprocessing: no augmentation). Returns the fit and the
    model's state with the probe as its head (the candidate `model.keep=better` compares); with `apply`
    (model.head_init=probe) the new head starts as the probe. One log line.

    Why start from the probe: a random head on a pretrained backbone learns slowly (timm's init gives
    logits of several units, a loss of 2x ln(classes)), and while it does, the gradients it sends back
    distort the pretrained features once they are unfrozen. Starting from the probe, fine-tuning has only
    to improve on the linear probe (Kumar et al. 2022, "LP-FT").
    """
    started = time.perf_counter()
    model = module.model
    linear = final_linear(model)
    labels: list[torch.Tensor] = []

    def inputs() -> Iterator[torch.Tensor]:
        for batch, targets in images:
            labels.append(targets)
            yield module._model_input(batch.to(linear.weight.device))

    features = _probe.features_of(model, linear, inputs())
    y = torch.cat(labels).numpy()
    fit = _probe.fit_probe(features, y, linear.out_features, seed)
    state = _probe.with_head(model, linear, fit)
    if apply:
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(fit.weight))
            linear.bias.copy_(torch.from_numpy(fit.bias))
    cv = (f"C={fit.c:g} by {fit.folds}-fold cross-validation, F1-macro {fit.cv_f1:.3f}" if fit.cv_f1 is not None
          else f"C={fit.c:g} (scikit-learn's default: a class has under {_probe.MIN_CV_PER_CLASS} images, "
               "too few to choose C by cross-validation)")
    log.info("linear probe: a logistic regression on %d frozen feature vectors (%d values each), %s, training "
             "accuracy %.3f%s (%.1fs)", len(y), features.shape[1], cv, fit.train_accuracy,
             "; head_init=probe: the head starts as it" if apply else "", time.perf_counter() - started)
    return fit, state

"""The linear probe of a pretrained backbone, and keeping the better of it and the fine-tuned model.

Private to `train`. The probe is scikit-learn's LogisticRegression on the frozen backbone's features of
the training images (eval preprocessing), its inverse L2 strength C chosen by stratified cross-validation
on those images; its weights are written into the model's own last linear layer, so a probe is a normal
model of the run's architecture (same checkpoint, same export, same predict).

With `model.keep=better` (the photo preset), once fine-tuning ends both candidates predict the
validation images and the fine-tuned model is kept only when it is clearly better there (`choose`);
otherwise the probe is written into checkpoints/best.ckpt. The loser stays beside it
(checkpoints/finetuned.ckpt or checkpoints/probe.ckpt), and run.json's "kept" says which and why.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf._files import atomic_path

log = logging.getLogger("imgclf.train")

# C values tried by cross-validation. Only scikit-learn's default, 1.0, the probe every benchmark (and a
# user's own check) compares with: when the probe is kept, imgclf's model then IS that probe, so the
# recipe never scores below it. A grid (0.1, 0.3, 1, 3) picked another C that cost 0.025 test F1 on
# wesnoth and gained 0.025 on openclipart (one seed each, docs/benchmarks.md): no evidence worth losing
# the guarantee for. The cross-validated score is still computed and logged. Below MIN_CV_PER_CLASS
# training images in the smallest class nothing is cross-validated: with one or two held-out images
# per class the scores are noise (tuxpaint, 5 per class: a C picked on them gave 0.31 vs 0.38 test F1).
C_GRID = (1.0,)
MAX_FOLDS = 3
MIN_CV_PER_CLASS = 10
# How far the fine-tuned model must beat the probe on the validation images, in standard deviations of
# the paired difference (see `choose`): a best-of-N-epochs score on a few dozen images is optimistic.
# 1.0 let a one-image lead through (1 vs 0 of 9 validation images: z = 1), and that model lost to the
# probe on the test images (tuxpaint, 5 per class, docs/benchmarks.md).
MIN_Z = 1.5
# Below this many training images in the smallest class the probe is kept without a comparison: the
# validation split then holds one or two images per class, and in the tiny benchmark (5-6 per class)
# fine-tuning never beat the probe on the test images.
MIN_FINETUNE_PER_CLASS = 10


@dataclass(frozen=True)
class ProbeFit:
    weight: np.ndarray  # (classes, features), float32
    bias: np.ndarray  # (classes,)
    c: float
    cv_f1: float | None  # mean macro-F1 over the folds at the chosen C; None when a class has < 2 images
    folds: int
    train_accuracy: float
    train_min_per_class: int  # training images of the smallest class


@dataclass(frozen=True)
class Choice:
    """run.json's "kept": which candidate is checkpoints/best.ckpt, and the figures that decided it."""

    kept: str  # "finetuned" or "probe"
    reason: str
    finetuned_val_f1: float
    probe_val_f1: float
    probe_cv_f1: float | None
    probe_c: float
    train_min_per_class: int
    val_images: int
    only_finetuned_right: int  # validation images the fine-tuned model gets right and the probe wrong
    only_probe_right: int
    z: float  # (only_finetuned_right - only_probe_right) / sqrt(their sum)

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# ---- fitting ------------------------------------------------------------------------------------
def features_of(model: nn.Module, linear: nn.Linear, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """What `linear` (the model's classification layer) sees for each image of `batches` (model inputs)."""
    captured: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.to(linear.weight.device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).numpy()


def fit_probe(features: np.ndarray, y: np.ndarray, classes: int, seed: int = 0) -> ProbeFit:
    """Logistic regression (L2, lbfgs) on the features, C chosen by stratified k-fold cross-validation
    (macro-F1) when every class has MIN_CV_PER_CLASS images, else scikit-learn's default C=1."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the matrices are small, and on a busy machine OpenBLAS's threads waiting on each
    # other made each fit 100x slower (0.1 s of CPU alone, minutes of wall time at a load of 20).
    with threadpool_limits(limits=1):
        return _fit_probe(features, y, classes, seed)


def _fit_probe(features: np.ndarray, y: np.ndarray, classes: int, seed: int) -> ProbeFit:
    from sklearn.linear_model import LogisticRegression

    counts = np.bincount(y, minlength=classes)
    smallest = int(counts[counts > 0].min()) if len(np.unique(y)) > 1 else 0
    folds = min(MAX_FOLDS, smallest) if smallest >= MIN_CV_PER_CLASS else 0
    c, cv_f1 = (1.0, None) if folds < 2 else _cross_validate(features, y, folds, seed)
    clf = LogisticRegression(C=c, max_iter=2000).fit(features, y)
    weight, bias = _as_head(clf, features.shape[1], classes)
    absent = np.setdiff1d(np.arange(classes), clf.classes_.astype(int))
    if len(absent):  # a class with no training image: never the most likely one (zero weights, low bias)
        bias[absent] = (features @ weight.T + bias)[:, clf.classes_.astype(int)].min() - 10.0
    return ProbeFit(weight, bias, c, cv_f1, folds if cv_f1 is not None else 0, float(clf.score(features, y)),
                    int(counts.min()))


def _cross_validate(features: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y))
    scores = {}
    for c in C_GRID:
        per_fold = []
        for train, held in splits:
            clf = LogisticRegression(C=c, max_iter=2000).fit(features[train], y[train])
            per_fold.append(f1_score(y[held], clf.predict(features[held]), average="macro"))
        scores[c] = float(np.mean(per_fold))
    best = max(C_GRID, key=lambda c: (scores[c], -abs(math.log(c))))  # ties: the C nearest the default
    return best, scores[best]


def _as_head(clf: Any, n_features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's coefficients as the (classes, features) weight and bias of a linear layer."""
    weight = np.zeros((classes, n_features), np.float32)
    bias = np.zeros(classes, np.float32)
    present = clf.classes_.astype(int)
    if len(present) == 2:  # scikit-learn's binary model is one score: split it evenly between the two rows
        weight[present] = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
        bias[present] = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    else:
        weight[present], bias[present] = clf.coef_, clf.intercept_
    return weight, bias


def with_head(model: nn.Module, linear: nn.Linear, fit: ProbeFit) -> dict[str, torch.Tensor]:
    """A copy of the model's state with `fit` as its classification layer: the probe as a model."""
    name = next(n for n, m in model.named_modules() if m is linear)
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    state[f"{name}.weight"] = torch.from_numpy(fit.weight)
    state[f"{name}.bias"] = torch.from_numpy(fit.bias)
    return state


# ---- keeping the better -------------------------------------------------------------------------
def choose(finetuned: np.ndarray, probe: np.ndarray, y: np.ndarray, classes: int, train_min_per_class: int,
           probe_cv_f1: float | None = None, probe_c: float = 1.0) -> Choice:
    """The fine-tuned model is kept when every class had MIN_FINETUNE_PER_CLASS training images and, on the
    same validation images, its macro-F1 is higher AND it is right on more images than the probe by at
    least MIN_Z standard deviations of that paired count (a sign test: b - c over sqrt(b + c)). Ties, and
    wins within the noise, go to the probe.

    Why paired and why a margin: both candidates predict the same images, so which images fell into a
    small validation split cancels out of the difference; the fine-tuned score is the best of several
    epochs on those same images (optimistic), while the probe never saw them.
    """
    from sklearn.metrics import f1_score

    labels = list(range(classes))
    ft_f1 = float(f1_score(y, finetuned, average="macro", labels=labels, zero_division=0))
    probe_f1 = float(f1_score(y, probe, average="macro", labels=labels, zero_division=0))
    only_ft = int(((finetuned == y) & (probe != y)).sum())
    only_probe = int(((probe == y) & (finetuned != y)).sum())
    z = (only_ft - only_probe) / math.sqrt(only_ft + only_probe) if only_ft + only_probe else 0.0
    figures = f"val F1-macro {ft_f1:.3f} fine-tuned vs {probe_f1:.3f} probe on {len(y)} images; " \
              f"{only_ft} right only fine-tuned, {only_probe} only probe (z={z:.2f})"
    if train_min_per_class < MIN_FINETUNE_PER_CLASS:
        kept, reason = "probe", f"{figures}: {train_min_per_class} training images in the smallest class, under " \
                                f"{MIN_FINETUNE_PER_CLASS}: too few to trust a fine-tuned model over the probe"
    elif ft_f1 > probe_f1 and z >= MIN_Z:
        kept, reason = "finetuned", f"{figures}: the fine-tuned model is clearly better"
    elif ft_f1 > probe_f1:
        kept, reason = "probe", f"{figures}: the fine-tuned model's lead is within the noise (z < {MIN_Z}), " \
                                "ties go to the probe"
    else:
        kept, reason = "probe", f"{figures}: the probe is as good or better"
    return Choice(kept, reason, ft_f1, probe_f1, probe_cv_f1, probe_c, train_min_per_class, len(y), only_ft,
                  only_probe, z)


def predictions(module: Any, state: dict[str, torch.Tensor], loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and labels of `loader` (eval preprocessing) with `state` loaded into the module's model."""
    model = module.model
    model.load_state_dict(state)
    device = next(model.parameters()).device
    preds, labels = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets in loader:
                preds.append(model(module._model_input(images.to(device))).argmax(1).cpu())
                labels.append(targets)
    finally:
        model.train(was_training)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The shipped model's tensors of a Lightning checkpoint (its "model." entries, prefix removed)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def keep_better(module: Any, best: Path, val_loader: Iterable[Any], probe_state: dict[str, torch.Tensor],
                fit: ProbeFit) -> Choice:
    """Compare the fine-tuned best checkpoint with the probe on the validation images; make best.ckpt the
    better one (the other is kept beside it), after one log line saying which and why."""
    started = time.perf_counter()
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    finetuned_state = model_state(ckpt)
    ft_pred, y = predictions(module, finetuned_state, val_loader)
    probe_pred, _ = predictions(module, probe_state, val_loader)
    choice = choose(ft_pred, probe_pred, y, len(module.class_names), fit.train_min_per_class, fit.cv_f1, fit.c)
    if choice.kept == "probe":
        shutil.copyfile(best, best.with_name("finetuned.ckpt"))
        ckpt["state_dict"] = {**{k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.")},
                              **{f"model.{k}": v for k, v in probe_state.items()}}
        with atomic_path(best) as tmp:
            torch.save(ckpt, tmp)
    else:
        with atomic_path(best.with_name("probe.ckpt")) as tmp:
            torch.save({"state_dict": {f"model.{k}": v for k, v in probe_state.items()},
                        "imgclf": ckpt["imgclf"]}, tmp)
    other = "finetuned.ckpt" if choice.kept == "probe" else "probe.ckpt"
    log.info("model.keep=better: kept the %s model (%s; probe C=%g, cross-validated F1 %s); the other is %s "
             "(%.1fs)", "linear probe" if choice.kept == "probe" else "fine-tuned", choice.reason, fit.c,
             "n/a" if fit.cv_f1 is None else f"{fit.cv_f1:.3f}", best.with_name(other), time.perf_counter() - started)
    return choice

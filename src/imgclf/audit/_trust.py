"""How far to trust the judge: the quality of the out-of-sample probabilities the audit decides with.

A label issue is only as good as the head that contradicts the label. On a small folder of real
photos the audit's own embedder reached 0.806 out-of-sample accuracy and proposed dropping 12
correct images at score 0.99 (issue 27). So the audit measures its judge before acting on it:

- **accuracy** of the cross-validated probabilities against the given labels, overall and per
  class (a class the head mostly gets wrong cannot accuse its members). The gate uses the accuracy
  on the images it does not flag: the flagged ones are where the given label is in question, and
  5% planted flips in a small class (18 images, 5 flipped in) otherwise halve its accuracy;
- **calibration**: one temperature T fitted to the out-of-sample log-probabilities by maximum
  likelihood (Guo et al. 2017, "On calibration of modern neural networks"), and the expected
  calibration error (ECE, 15 equal-width confidence bins) before and after. Both are taken on the
  scored images minus the flagged label issues: the given labels hold the very errors we look
  for, and counting them would call the label noise miscalibration (with 4 flips in 81 images
  the shipped model's T came out 1.9 and its ECE 0.125, both from the flips). ECE measured on n
  images carries sampling noise of about 1 / sqrt(n), which the threshold allows for.

`score` in audit.csv is then 1 - p_T(given label): the estimated probability that the given label
is wrong. A label issue is proposed for `drop` only when the judge as a whole is trusted
(accuracy >= MIN_ACCURACY and calibrated ECE <= MAX_ECE + 1 / sqrt(n)), the given class reaches
MIN_CLASS_ACCURACY, and the score is at least DROP_SCORE; every other flagged image is proposed
for `review`, and the summary says which rule held it back.

Why these numbers (benchmarks/audit_real.py, docs/benchmarks.md "Issue 27"): on 477 Tux Paint
clip-art stamps in 12 classes with 24 planted flips, the efficientnet_lite0 judge (accuracy 0.86
on the unflagged images) flags 38 images of which half are honest confusions inside its weakest
classes (christmas 0.37, insects 0.45); its probabilities are well calibrated on average (ECE
0.04) but not in the last percent, where clean images of a weak class get p(given) = 0.001 too.
Requiring a score of 0.99 and a given class the head gets right 80% of the time leaves 15 drops,
13 of them flips (precision 0.87, recall 0.54), and 3 drops (0.6%) on the same images without
flips. The self-trained embedder on the same images reaches 0.37-0.48 and drops nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

# Documented thresholds (docs/audit.md, "How far the audit trusts itself").
MIN_ACCURACY = 0.85  # out-of-sample accuracy of the head on the unflagged images below this: no drop at all
MAX_ECE = 0.05  # calibrated expected calibration error above this: no drop at all
MIN_CLASS_ACCURACY = 0.80  # a label issue in a class the head gets right less often than this: review
DROP_SCORE = 0.99  # estimated probability that the label is wrong, at least, for a drop
ECE_BINS = 15


@dataclass
class Judge:
    accuracy: float  # on the unflagged scored images (what the gate uses)
    accuracy_all: float  # on every scored image
    ece: float  # of the raw out-of-sample probabilities
    temperature: float
    ece_calibrated: float
    class_accuracy: np.ndarray  # (K,) recall of each class out of sample (nan: class not scored)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    trusted: bool = False
    reasons: list[str] = field(default_factory=list)  # why not trusted (empty when trusted)

    def to_plain(self) -> dict[str, Any]:
        return {"out_of_sample_accuracy": round(self.accuracy_all, 4), "accuracy_unflagged": round(self.accuracy, 4),
                "ece": round(self.ece, 4),
                "temperature": round(self.temperature, 4), "ece_calibrated": round(self.ece_calibrated, 4),
                "trusted": self.trusted, "reasons": self.reasons, "per_class": self.per_class,
                "thresholds": {"min_accuracy": MIN_ACCURACY, "max_ece": MAX_ECE,
                               "min_class_accuracy": MIN_CLASS_ACCURACY, "drop_score": DROP_SCORE}}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    if not len(labels):
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


def _scaled(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    z = log_probs / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that maximises the likelihood of the labels under softmax(log p / T)."""
    log_probs = np.log(np.clip(probs, 1e-12, None))

    def nll(t: float) -> float:
        return float(-np.log(np.clip(_scaled(log_probs, t)[np.arange(len(labels)), labels], 1e-12, None)).mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x) if len(labels) else 1.0


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities; an all-zero row (image not scored) stays zero."""
    scored = probs.sum(axis=1) > 0
    out = np.zeros_like(probs)
    if scored.any():
        sub = probs[scored]
        present = sub.sum(axis=0) > 0  # classes never predicted (unscored) stay at 0
        out_sub = np.zeros_like(sub)
        out_sub[:, present] = _scaled(np.log(np.clip(sub[:, present], 1e-12, None)), temperature)
        out[scored] = out_sub
    return out


def assess(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
           suspects: np.ndarray) -> tuple[Judge, np.ndarray]:
    """The judge's quality on the scored images (labels >= 0), and the calibrated probabilities.

    `suspects` (indices of the flagged label issues) are left out of the calibration fit and ECE.
    """
    scored = labels >= 0
    y = labels[scored]
    trusted_rows = scored.copy()
    trusted_rows[np.asarray(suspects, dtype=int)] = False
    temperature = fit_temperature(probs[trusted_rows], labels[trusted_rows])
    calibrated = calibrate(probs, temperature)
    predicted = probs.argmax(axis=1)
    right = predicted == labels
    accuracy_all = float(right[scored].mean()) if scored.any() else 0.0
    accuracy = float(right[trusted_rows].mean()) if trusted_rows.any() else 0.0
    class_accuracy = np.full(len(class_names), np.nan)
    per_class = []
    for k, name in enumerate(class_names):
        clean = trusted_rows & (labels == k)
        if clean.any():
            class_accuracy[k] = float(right[clean].mean())
            per_class.append({"class": name, "images": int((labels == k).sum()), "flagged": int((y == k).sum()
                              - clean.sum()), "accuracy": round(class_accuracy[k], 4),
                              "ece_calibrated": round(expected_calibration_error(calibrated[clean], labels[clean]), 4)})
    ece_raw = expected_calibration_error(probs[trusted_rows], labels[trusted_rows])
    judge = Judge(accuracy, accuracy_all, ece_raw, temperature,
                  expected_calibration_error(calibrated[trusted_rows], labels[trusted_rows]), class_accuracy, per_class)
    max_ece = MAX_ECE + 1.0 / np.sqrt(max(int(trusted_rows.sum()), 1))
    if judge.accuracy < MIN_ACCURACY:
        judge.reasons.append(f"out-of-sample accuracy {judge.accuracy:.3f} (on the unflagged images) is below "
                             f"{MIN_ACCURACY:.2f}")
    if judge.ece_calibrated > max_ece:
        judge.reasons.append(f"calibration error (ECE) {judge.ece_calibrated:.3f} is above {max_ece:.3f} "
                             f"({MAX_ECE:.2f} + 1/sqrt(images))")
    judge.trusted = not judge.reasons
    return judge, calibrated


def drop_allowed(judge: Judge, given: np.ndarray, suggested: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(M,) bool: which label issues (given class, suggested class, score) the judge may propose to drop.

    Only the given class is held to MIN_CLASS_ACCURACY: it is the class whose member is accused; the
    suggestion may be a class the head knows less well (the label is wrong either way)."""
    if not judge.trusted:
        return np.zeros(len(given), dtype=bool)
    acc = np.nan_to_num(judge.class_accuracy, nan=0.0)
    return (acc[given] >= MIN_CLASS_ACCURACY) & (score >= DROP_SCORE)

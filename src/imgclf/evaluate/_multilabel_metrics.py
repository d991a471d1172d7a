"""Multi-label metrics, their bootstrap intervals and the frequency baseline: pure numpy functions.

`y` is an (N, C) {0, 1} matrix of true label sets, `proba` the (N, C) sigmoid probabilities and
`pred` the (N, C) decisions (proba >= the label's threshold). Point figures come from scikit-learn;
the bootstrap resamples images and recomputes every figure from per-label counts weighted by how
often each image was drawn (numpy, in chunks), because calling scikit-learn per resample and label
would dominate the evaluation time. tests/test_multilabel_eval.py checks both agree.

Definitions (docs/multilabel.md):
- per label: precision, recall, F1 (0 where undefined) and average precision (AP; None without a
  positive in the split);
- micro F1 pools every (image, label) decision; macro F1 and mAP average over the labels with at
  least one positive in the split (a label the split never shows cannot be scored);
- subset accuracy: images whose predicted set equals the true set; Hamming loss: share of wrong
  (image, label) decisions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn import metrics as skm

HEADLINE = ("f1_micro", "f1_macro", "map", "subset_accuracy", "hamming_loss")
_MAX_CHUNK_CELLS = 8_000_000  # resamples per chunk * images * labels: ~64 MB per float64 array


def point_metrics(y: np.ndarray, proba: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    present = np.flatnonzero(y.sum(axis=0) > 0)
    ap = per_label_ap(y, proba)
    return {
        "f1_micro": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
        "f1_macro": (float(skm.f1_score(y[:, present], pred[:, present], average="macro", zero_division=0))
                     if len(present) else None),
        "map": float(np.mean([ap[j] for j in present])) if len(present) else None,
        "subset_accuracy": float(skm.accuracy_score(y, pred)),
        "hamming_loss": float(skm.hamming_loss(y, pred)),
    }


def per_label_ap(y: np.ndarray, proba: np.ndarray) -> list[float | None]:
    return [float(skm.average_precision_score(y[:, j], proba[:, j])) if y[:, j].any() else None
            for j in range(y.shape[1])]


def per_label(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, class_names: list[str],
              thresholds: list[float]) -> dict[str, dict[str, float | int | None]]:
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    ap = per_label_ap(y, proba)
    return {name: {"precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                   "ap": ap[j], "support": int(support[j]), "predicted": int(pred[:, j].sum()),
                   "threshold": float(thresholds[j])}
            for j, name in enumerate(class_names)}


# ---- bootstrap ------------------------------------------------------------------------------------
def _weights(n: int, resamples: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """(b, N) counts: how often each image is drawn in each resample, in chunks."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        draws = rng.integers(0, n, size=(b, n))
        yield np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)


def _weighted_ap(w: np.ndarray, y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(b,) average precision of one label under resample weights `w` (b, N); NaN without a positive.
    Step-wise as scikit-learn: sum over distinct thresholds of (recall gain) * precision."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], y[order].astype(np.float64)
    last = np.append(s[1:] != s[:-1], True)  # the last image of each group of tied scores
    tp = np.cumsum(w[:, order] * t, axis=1)[:, last]
    fp = np.cumsum(w[:, order] * (1 - t), axis=1)[:, last]
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
        gain = np.diff(np.concatenate([np.zeros((len(w), 1)), tp], axis=1), axis=1) / total
        return np.where(total[:, 0] > 0, (gain * precision).sum(axis=1), np.nan)


def _from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label precision/recall/F1 (b, C), 0 where undefined, as scikit-learn's zero_division=0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
                "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
                "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)}


def bootstrap(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, resamples: int, seed: int,
              level: float) -> dict[str, object]:
    """Percentile intervals (`level`) of the headline figures and of each label's P/R/F1/AP."""
    n, c = y.shape
    present = np.flatnonzero(y.sum(axis=0) > 0)
    yb, pb = y.astype(bool), pred.astype(bool)
    hit, false_pos, miss = (yb & pb).astype(float), (~yb & pb).astype(float), (yb & ~pb).astype(float)
    exact = (yb == pb).all(axis=1).astype(float)
    wrong = (yb != pb).mean(axis=1)
    chunk = max(1, _MAX_CHUNK_CELLS // max(1, n * max(c, 1)))
    head: dict[str, list[np.ndarray]] = {k: [] for k in HEADLINE}
    labels: dict[str, list[np.ndarray]] = {k: [] for k in ("precision", "recall", "f1", "ap")}
    for w in _weights(n, resamples, seed, chunk):
        tp, fp, fn = w @ hit, w @ false_pos, w @ miss
        per = _from_counts(tp, fp, fn)
        ap = np.stack([_weighted_ap(w, y[:, j], proba[:, j]) for j in range(c)], axis=1)
        sums = (tp.sum(1), fp.sum(1), fn.sum(1))
        head["f1_micro"].append(np.where(2 * sums[0] + sums[1] + sums[2] > 0,
                                         2 * sums[0] / np.maximum(2 * sums[0] + sums[1] + sums[2], 1e-12), 0.0))
        head["f1_macro"].append(per["f1"][:, present].mean(1) if len(present) else np.full(len(w), np.nan))
        with np.errstate(all="ignore"):
            head["map"].append(np.nanmean(ap[:, present], axis=1) if len(present) else np.full(len(w), np.nan))
        head["subset_accuracy"].append(w @ exact / n)
        head["hamming_loss"].append(w @ wrong / n)
        for key in ("precision", "recall", "f1"):
            labels[key].append(per[key])
        labels["ap"].append(ap)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[~np.isnan(values)]
        return [float(np.percentile(values, lo)), float(np.percentile(values, hi))] if len(values) else None

    return {
        "headline": {k: interval(np.concatenate(v)) for k, v in head.items()},
        "per_label": {k: [interval(col) for col in np.concatenate(v).T] for k, v in labels.items()},
    }


# ---- the frequency baseline -----------------------------------------------------------------------
def frequency_baseline(y: np.ndarray, train_freq: np.ndarray, simulations: int, seed: int) -> dict[str, object]:
    """A model that says each label with its training frequency, knowing nothing of the image.

    Its scores are that frequency for every image, so each label's AP is the label's share of the
    split (one tied score: precision = prevalence at recall 1), and mAP their mean. Its decisions
    are drawn at random with those frequencies (`simulations` times): F1, subset accuracy and
    Hamming loss are the means over the draws, with their standard deviations."""
    n, c = y.shape
    present = np.flatnonzero(y.sum(axis=0) > 0)
    yb = y.astype(bool)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_CELLS // max(1, n * max(c, 1)))
    figures: dict[str, list[np.ndarray]] = {k: [] for k in ("f1_micro", "f1_macro", "subset_accuracy",
                                                            "hamming_loss")}
    per_f1 = []
    for start in range(0, simulations, chunk):
        b = min(chunk, simulations - start)
        draws = rng.random((b, n, c)) < train_freq[None, None, :]
        tp = (draws & yb).sum(1).astype(float)
        fp = (draws & ~yb).sum(1).astype(float)
        fn = (~draws & yb).sum(1).astype(float)
        f1 = _from_counts(tp, fp, fn)["f1"]
        per_f1.append(f1)
        t, f, m = tp.sum(1), fp.sum(1), fn.sum(1)
        figures["f1_micro"].append(np.where(2 * t + f + m > 0, 2 * t / np.maximum(2 * t + f + m, 1e-12), 0.0))
        figures["f1_macro"].append(f1[:, present].mean(1) if len(present) else np.zeros(b))
        figures["subset_accuracy"].append((draws == yb).all(axis=2).mean(1))
        figures["hamming_loss"].append((draws != yb).mean(axis=(1, 2)))
    prevalence = y.mean(axis=0)
    out: dict[str, object] = {}
    for key, values in figures.items():
        joined = np.concatenate(values)
        out[key] = float(joined.mean())
        out[f"{key}_std"] = float(joined.std())
    out["map"] = float(prevalence[present].mean()) if len(present) else None
    out["per_label_f1"] = np.concatenate(per_f1).mean(0).tolist()
    out["per_label_ap"] = [float(prevalence[j]) if j in set(present.tolist()) else None for j in range(c)]
    return out


def cooccurrence(y: np.ndarray) -> np.ndarray:
    """(C, C) counts of images carrying both labels; the diagonal is each label's count."""
    y = y.astype(np.int64)
    return y.T @ y

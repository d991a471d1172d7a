"""Metrics, bootstrap confidence intervals and baselines: pure functions on numpy arrays.

Labels are class indices 0..K-1; `proba` is an (N, K) array of predicted probabilities.
Point metrics come from scikit-learn; the bootstrap and the random-baseline simulations
compute F1-macro from confusion matrices in bulk (numpy), because calling scikit-learn
a thousand times would dominate the evaluation time. Both follow scikit-learn's rule
for F1-macro: the mean over the classes present in y_true or y_pred, with F1 = 0 for a
class that is predicted but never true (or the reverse).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn import metrics as skm

BOOTSTRAP_RESAMPLES = 1000
BASELINE_SIMULATIONS = 1000
CI_LEVEL = 0.95
# A chunk of B resamples holds B * N indices and B * K * K confusion cells; capping both
# keeps memory near 64 MB per array for any N and K (1000 classes: 8 resamples per chunk).
_MAX_CHUNK_CELLS = 8_000_000


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Headline metrics on one split. top5_accuracy is None with 5 classes or fewer."""
    k = proba.shape[1]
    labels = np.arange(k)
    y_pred = proba.argmax(axis=1)
    return {
        "f1_macro": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "top5_accuracy": (float(skm.top_k_accuracy_score(y_true, proba, k=5, labels=labels))
                          if k > 5 else None),
        "log_loss": float(skm.log_loss(y_true, proba, labels=labels)),
    }


def per_class(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for every class the model knows (support 0 included)."""
    labels = np.arange(len(class_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted ones."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _batched_confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(B, K, K) confusion matrices for (B, N) label arrays, in one bincount."""
    b = y_true.shape[0]
    codes = (np.arange(b)[:, None] * (k * k) + y_true * k + y_pred).ravel()
    return np.bincount(codes, minlength=b * k * k).reshape(b, k, k)


def f1_macro_from_confusion(cm: np.ndarray) -> np.ndarray:
    """F1-macro of one (K, K) or many (B, K, K) confusion matrices, as scikit-learn defines it."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    true_n, pred_n = cm.sum(axis=-1), cm.sum(axis=-2)
    denom = true_n + pred_n  # = 2tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def _chunks(total: int, n: int, k: int) -> Iterator[int]:
    size = max(1, _MAX_CHUNK_CELLS // max(n, k * k, 1))
    for start in range(0, total, size):
        yield min(size, total - start)


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, k: int, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0, level: float = CI_LEVEL) -> dict[str, list[float]]:
    """Percentile bootstrap intervals for accuracy and F1-macro (images resampled with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    acc, f1 = [], []
    for size in _chunks(resamples, n, k):
        idx = rng.integers(0, n, size=(size, n))
        t, p = y_true[idx], y_pred[idx]
        acc.append((t == p).mean(axis=1))
        f1.append(f1_macro_from_confusion(_batched_confusion(t, p, k)))
    tail = (1 - level) / 2 * 100
    return {name: [float(v) for v in np.percentile(np.concatenate(values), [tail, 100 - tail])]
            for name, values in (("accuracy", acc), ("f1_macro", f1))}


def class_shares(labels: np.ndarray, k: int) -> np.ndarray:
    """Share of each class 0..K-1 among `labels` (zeros where a class is absent)."""
    counts = np.bincount(labels, minlength=k).astype(float)
    if counts.sum() == 0:
        raise ValueError("class_shares: no labels")
    return counts / counts.sum()


def random_baseline(y_true: np.ndarray, shares: np.ndarray, simulations: int = BASELINE_SIMULATIONS,
                    seed: int = 0) -> dict[str, float | None]:
    """A guesser that draws class k with probability shares[k], independently for every image.

    Expected accuracy is exact: sum_k share_true[k] * shares[k]. F1-macro has no closed form,
    so it is the mean (and standard deviation) over seeded simulated guess sequences.
    log_loss is that of predicting `shares` as the probabilities for every image.
    """
    k = len(shares)
    n = len(y_true)
    rng = np.random.default_rng(seed)
    f1 = []
    for size in _chunks(simulations, n, k):
        guesses = rng.choice(k, size=(size, n), p=shares)
        truth = np.broadcast_to(y_true, guesses.shape)
        f1.append(f1_macro_from_confusion(_batched_confusion(truth, guesses, k)))
    f1_all = np.concatenate(f1)
    with np.errstate(divide="ignore"):
        nll = -np.log(shares[y_true])
    return {
        "accuracy": float(np.dot(class_shares(y_true, k), shares)),
        "f1_macro": float(f1_all.mean()),
        "f1_macro_std": float(f1_all.std()),
        # None (not inf, which JSON cannot hold) when a test class never occurs in training.
        "log_loss": float(nll.mean()) if np.isfinite(nll.mean()) else None,
        "simulations": simulations,
    }


def majority_baseline(y_true: np.ndarray, train_shares: np.ndarray) -> dict[str, float | int]:
    """Always predict the most frequent training class (the lowest index on a tie)."""
    majority = int(np.argmax(train_shares))
    y_pred = np.full_like(y_true, majority)
    return {
        "class_index": majority,
        "accuracy": float(np.mean(y_true == majority)),
        "f1_macro": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def most_confused(cm: np.ndarray, top: int = 15) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the largest off-diagonal cells, largest first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    pairs = sorted(zip(rows.tolist(), cols.tolist(), off[rows, cols].tolist(), strict=True),
                   key=lambda p: (-p[2], p[0], p[1]))
    return [(int(i), int(j), int(c)) for i, j, c in pairs[:top]]

"""Outliers: images unlike any class, far from their nearest neighbours in embedding space.

The score is the mean cosine distance to the k nearest other images. What counts as far depends
on the model and the data, so the cut is relative: the modified z-score of Iglewicz and Hoaglin
(1993), 0.6745 (x - median) / MAD, above 3.5 (their recommended outlier threshold), taken on the
logarithm of the distance: a trained classifier packs each class tightly, so distances span orders
of magnitude and a linear scale would call every image between two clusters an outlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgclf.audit._duplicates import Neighbours

MODIFIED_Z = 3.5


@dataclass
class Outliers:
    distance: np.ndarray  # (N,) mean cosine distance to the nearest neighbours (0 for unreadable rows)
    zscore: np.ndarray  # (N,) modified z-score of the distance
    flagged: np.ndarray  # indices, most isolated first


def find_outliers(neighbours: Neighbours, valid: np.ndarray, threshold: float = MODIFIED_Z) -> Outliers:
    n = len(valid)
    distance = np.zeros(n)
    zscore = np.zeros(n)
    ids = np.flatnonzero(valid)
    if len(ids) < 3 or neighbours.similarity.shape[1] == 0:
        return Outliers(distance, zscore, np.zeros(0, dtype=int))
    distance[ids] = np.clip(1.0 - neighbours.similarity.mean(axis=1), 0.0, 2.0)
    log_d = np.log(distance[ids] + 1e-6)
    median = np.median(log_d)
    # A MAD of 0 (most images identical to their neighbours) would flag everything that differs at all.
    mad = max(float(np.median(np.abs(log_d - median))), 0.05)
    zscore[ids] = 0.6745 * (log_d - median) / mad
    flagged = ids[zscore[ids] > threshold]
    return Outliers(distance, zscore, flagged[np.argsort(-zscore[flagged], kind="stable")])

"""Label issues: out-of-sample class probabilities for every image, ranked by cleanlab.

Probabilities come from a linear head (multinomial logistic regression on standardised
embeddings) fitted with stratified k-fold cross-validation: each image is scored by a head that
never saw its label. cleanlab's `find_label_issues` (confident learning, Northcutt et al. 2021)
then flags the images whose given label the probabilities contradict, ranked by self-confidence
(the out-of-sample probability of the given label).

cleanlab sizes the flagged set by the off-diagonal of its confident joint, which counts the
honest confusions of a weak head (Shirt vs T-shirt) as noise: with the embedder the audit trains
for itself (out-of-sample accuracy 0.78 on the bundled sample) it flagged 410 training images for
150 flips (precision 0.35). A flagged image is therefore also required to get less than a fifth of
chance for its given label (p(given) < 0.2 / classes, `max_self_confidence`): the same run then
flags 150 at precision 0.83, recall 0.83; with the shipped model's embeddings 156 at 0.90 / 0.94
(cleanlab alone: 0.85 / 0.96). Label noise between look-alike classes, where the head still gives
the given label a fair share, is what this leaves unflagged; `--max-self-confidence 1` flags
all that cleanlab finds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

# Above PCA_ABOVE_ROWS images the head sees at most MAX_HEAD_DIMS dimensions (PCA): a 1024-wide
# embedding of tens of thousands of images would cost minutes per fold in lbfgs and add little.
# Below, it sees them all: on 477 real clip-art images PCA to 256 of efficientnet_lite0's 1280
# features lowered the precision of the drops from 0.87 to 0.76 at the same recall (issue 27).
MAX_HEAD_DIMS = 256
PCA_ABOVE_ROWS = 10_000


@dataclass
class LabelFindings:
    probs: np.ndarray  # (N, K) out-of-sample probabilities (rows of unscored images are 0)
    scored: np.ndarray  # (N,) bool: images whose class had enough examples to be scored
    issues: np.ndarray  # indices of flagged images, most suspicious first
    quality: np.ndarray  # (N,) cleanlab label quality (self-confidence), 1 for unscored rows
    class_summary: list[dict] = field(default_factory=list)
    overlapping: list[dict] = field(default_factory=list)


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int,
                        seed: int) -> np.ndarray:
    """(N, K) probabilities from a cross-validated logistic-regression head."""
    # PCA (large sets only) is fitted on each fold's training part: at most that many rows.
    dims = max(1, min(MAX_HEAD_DIMS, features.shape[1], len(features) * (folds - 1) // folds - 1))
    steps = [StandardScaler()]
    if features.shape[1] > dims and len(features) > PCA_ABOVE_ROWS:
        steps.append(PCA(dims, random_state=seed))
    head = make_pipeline(*steps, LogisticRegression(C=0.5, max_iter=300))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # lbfgs stopping at max_iter still gives usable probabilities; the warning is noise here.
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        probs = cross_val_predict(head, features, labels, cv=cv, method="predict_proba")
    full = np.zeros((len(labels), n_classes))
    full[:, np.unique(labels)] = probs  # cross_val_predict orders columns by the classes present
    return full


# A flagged image's given label gets less than this share of chance (1 / classes), out of sample.
CHANCE_SHARE = 0.2


def find_issues(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                filter_by: str = "prune_by_noise_rate", max_self_confidence: float | None = None) -> LabelFindings:
    """cleanlab over the scored images (labels -1 = not scored), kept where p(given) < max_self_confidence
    (default: CHANCE_SHARE / classes)."""
    from cleanlab.dataset import find_overlapping_classes, rank_classes_by_label_quality
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scored = labels >= 0
    present = np.unique(labels[scored])
    remap = np.full(len(class_names), -1)
    remap[present] = np.arange(len(present))
    sub_labels = remap[labels[scored]]
    sub_probs = probs[scored][:, present]
    sub_probs = sub_probs / np.clip(sub_probs.sum(axis=1, keepdims=True), 1e-12, None)
    quality = np.ones(len(labels))
    issues = np.array([], dtype=int)
    summary: list[dict] = []
    overlap: list[dict] = []
    if len(present) >= 2 and len(sub_labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cleanlab warns about tiny classes; we report them ourselves
            ranked = find_label_issues(sub_labels, sub_probs, filter_by=filter_by,
                                       return_indices_ranked_by="self_confidence", n_jobs=1)
            sub_quality = get_label_quality_scores(sub_labels, sub_probs, method="self_confidence")
            quality[scored] = sub_quality
            ceiling = CHANCE_SHARE / len(present) if max_self_confidence is None else max_self_confidence
            ranked = [i for i in np.asarray(ranked, dtype=int) if sub_quality[i] < ceiling]
            summary = _class_summary(rank_classes_by_label_quality(sub_labels, sub_probs), present, class_names)
            overlap = _overlap(find_overlapping_classes(sub_labels, sub_probs), present, class_names)
        issues = np.flatnonzero(scored)[np.asarray(ranked, dtype=int)]
    return LabelFindings(probs, scored, issues, quality, summary, overlap)


def _class_summary(frame, present: np.ndarray, class_names: list[str]) -> list[dict]:
    return [{"class": class_names[present[int(r["Class Index"])]],
             "label_issues": int(r["Label Issues"]),
             "label_noise": round(float(r["Label Noise"]), 4),
             "label_quality": round(float(r["Label Quality Score"]), 4)}
            for _, r in frame.sort_values("Label Issues", ascending=False).iterrows()]


def _overlap(frame, present: np.ndarray, class_names: list[str], top: int = 15) -> list[dict]:
    return [{"a": class_names[present[int(r["Class Index A"])]],
             "b": class_names[present[int(r["Class Index B"])]],
             "examples": int(r["Num Overlapping Examples"]),
             "joint_probability": round(float(r["Joint Probability"]), 4)}
            for _, r in frame.head(top).iterrows() if int(r["Num Overlapping Examples"]) > 0]


def scorable_labels(labels: np.ndarray, folds: int) -> tuple[np.ndarray, int]:
    """Labels with classes too small to cross-validate set to -1, and the folds to use.

    A class needs 2 images to be scored (one to fit, one to score). Folds shrink to the smallest
    scored class (at least 2) so every fold's head sees every class.
    """
    counts = np.bincount(labels[labels >= 0], minlength=1)
    small = np.flatnonzero((counts > 0) & (counts < 2))
    out = np.where(np.isin(labels, small), -1, labels)
    kept = counts[counts >= 2]
    return out, int(max(2, min(folds, kept.min()))) if kept.size else folds

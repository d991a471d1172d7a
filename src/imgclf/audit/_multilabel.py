"""Label issues of multi-label data (`audit --task multilabel`): missing and extra tags per image.

Each image carries a set of labels (the manifest's label cell split at `--label-sep`; rows of the
same content, e.g. one image in several class folders, are one image whose set is their union).
As for single-label data, each image is scored by a head that never saw its labels: a one-vs-rest
logistic regression on the standardised embeddings (one binary head per label), fitted with
iteratively stratified k-fold cross-validation (iterstrat's MultilabelStratifiedKFold, Sechidis et
al. 2011: every fold keeps each label's share). cleanlab's multi-label finder
(`cleanlab.multilabel_classification.filter.find_label_issues`) then flags the images whose set the
out-of-sample probabilities contradict, most suspicious first.

A flagged image is reported with what is wrong with its set: *missing* tags (not given, probability
at or above the label's threshold) and *extra* tags (given, probability below it); `suggested` is the
corrected set. The thresholds are those training would choose (`multilabel.choose_thresholds`:
per-label best F1 on the out-of-sample probabilities). Every finding is proposed for review: the
single-label trust gate (calibration, per-class accuracy) has no multi-label counterpart here yet,
so nothing is dropped on the head's word.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from imgclf.errors import DataError
from imgclf.multilabel import choose_thresholds, encode, join_labels, parse_labels, vocabulary

log = logging.getLogger(__name__)

TASK = "multilabel"
# The model trained on the data when no --model or backbone judges: a multi-label one (sigmoid, BCE);
# the single-label embedder's label smoothing is for softmax targets.
EMBEDDER_OVERRIDES = ["task=multilabel", "loss.name=bce", "loss.label_smoothing=0"]


@dataclass(frozen=True)
class MultilabelIssues:
    probs: np.ndarray  # (N, C) out-of-sample per-label probabilities (0 for unscored labels)
    thresholds: list[float]
    issues: np.ndarray  # indices of flagged images, most suspicious first
    missing: list[list[str]]  # per flagged image
    extra: list[list[str]]
    scores: np.ndarray  # per flagged image: the worst disagreement (1 - p of an extra tag, or p of a missing one)


def audited_rows(ok: pd.DataFrame, sep: str, where: object) -> tuple[pd.DataFrame, list[str]]:
    """The manifest's ok rows with one row per image content (sha256), its label cell the union of the
    sets of its copies (joined with `sep`), and the label vocabulary."""
    sets = [parse_labels(cell, sep) for cell in ok["label"]]
    merged = ok.assign(_set=sets).groupby("sha256", sort=False, as_index=False)
    first = merged.head(1).copy()
    union = merged["_set"].agg(lambda s: join_labels((x for labels in s for x in labels), sep))
    first["label"] = first["sha256"].map(dict(zip(union["sha256"], union["_set"], strict=True)))
    names = vocabulary(parse_labels(cell, sep) for cell in first["label"])
    if len(names) < 2:
        raise DataError(f"{where}: {len(names)} label(s) in the label cells split at {sep!r}; "
                        "a multi-label audit needs at least 2")
    return first.drop(columns="_set").reset_index(drop=True), names


def out_of_sample_probs(features: np.ndarray, targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N, C) probabilities from a cross-validated one-vs-rest logistic-regression head.

    A label with fewer positives than folds cannot appear in every fold's training part; its column
    is predicted at its training frequency there (OneVsRestClassifier's constant head)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros(targets.shape, dtype=np.float64)
    cv = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
        warnings.filterwarnings("ignore", message=".*not present in all training examples.*")
        for fit, score in cv.split(features, targets):
            head = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=0.05, max_iter=300)))
            head.fit(features[fit], targets[fit])
            probs[score] = head.predict_proba(features[score])
    return probs


def find_issues(probs: np.ndarray, targets: np.ndarray, names: list[str]) -> MultilabelIssues:
    """cleanlab's multi-label finder, then per flagged image its missing and extra tags."""
    from cleanlab.multilabel_classification.filter import find_label_issues

    thresholds = choose_thresholds(probs, targets)
    given = [list(np.flatnonzero(row)) for row in targets]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about rare labels; the summary counts them
        ranked = np.asarray(find_label_issues(given, probs, return_indices_ranked_by="self_confidence",
                                              n_jobs=1), dtype=int)
    cut = np.asarray(thresholds)[None, :]
    missing_mask = (targets == 0) & (probs >= cut)
    extra_mask = (targets == 1) & (probs < cut)
    missing = [[names[j] for j in np.flatnonzero(missing_mask[i])] for i in ranked]
    extra = [[names[j] for j in np.flatnonzero(extra_mask[i])] for i in ranked]
    disagreement = np.where(targets == 1, 1.0 - probs, probs)  # how strongly each tag's state is contradicted
    scores = disagreement[ranked].max(axis=1) if len(ranked) else np.zeros(0)
    return MultilabelIssues(probs, thresholds, ranked, missing, extra, scores)


def label_issue_rows(ok: pd.DataFrame, found: MultilabelIssues, sep: str, names: list[str]) -> pd.DataFrame:
    """audit.csv rows (kind label_issue, action review): suggested = the corrected set."""
    from imgclf.audit._findings import _rows

    suggested, detail = [], []
    for i, missing, extra in zip(found.issues, found.missing, found.extra, strict=True):
        kept = set(parse_labels(ok["label"].iloc[i], sep)) - set(extra)
        suggested.append(join_labels(kept | set(missing), sep))
        def shown(tags: list[str], i: int = i) -> str:
            return ", ".join(f"{t} (p={found.probs[i, names.index(t)]:.2f})" for t in tags)

        parts = ([f"missing: {shown(missing)}"] if missing else []) + ([f"extra: {shown(extra)}"] if extra else [])
        detail.append("; ".join(parts) or "the set as a whole is unlikely (no single tag crosses its threshold)")
    return _rows(ok, found.issues, "label_issue", suggested=suggested, score=np.round(found.scores, 4),
                 action="review", detail=detail)


def summary(found: MultilabelIssues, targets: np.ndarray, names: list[str]) -> dict:
    """audit.json's multi-label part: per label how many images miss it / carry it wrongly, and how well
    the head does out of sample (mAP, micro F1 at the thresholds): how far to trust the findings."""
    from sklearn.metrics import average_precision_score, f1_score

    flagged = np.zeros(len(targets), dtype=bool)
    flagged[found.issues] = True
    per_label = []
    for j, name in enumerate(names):
        missing = sum(name in m for m in found.missing)
        extra = sum(name in e for e in found.extra)
        per_label.append({"label": name, "images": int(targets[:, j].sum()), "missing": missing, "extra": extra})
    scorable = [j for j in range(len(names)) if 0 < targets[:, j].sum() < len(targets)]
    predicted = found.probs >= np.asarray(found.thresholds)[None, :]
    return {
        "task": TASK,
        "label_issues_by_label": sorted(per_label, key=lambda r: -(r["missing"] + r["extra"])),
        "out_of_sample_map": round(float(np.mean([average_precision_score(targets[:, j], found.probs[:, j])
                                                  for j in scorable])), 4) if scorable else None,
        "out_of_sample_micro_f1": round(float(f1_score(targets, predicted, average="micro", zero_division=0)), 4),
        "images_without_label": int((targets.sum(axis=1) == 0).sum()),
        # The single-label summary's keys (audit.html reads them): no softmax judge, no class pairs.
        "overlapping_classes": [], "out_of_sample_accuracy": None, "judge": None, "unscored_classes": [],
        "thresholds": dict(zip(names, (round(t, 4) for t in found.thresholds), strict=True)),
    }


def judge(ok: pd.DataFrame, names: list[str], features: np.ndarray, readable: np.ndarray, sep: str, folds: int,
          seed: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(label-issue rows, (N, C) out-of-sample probabilities, summary) for the readable images."""
    targets = encode([parse_labels(cell, sep) for cell in ok["label"]], names)
    probs = np.zeros(targets.shape, dtype=np.float64)
    ids = np.flatnonzero(readable)
    if len(ids) < 4:
        raise DataError(f"{len(ids)} readable images: a multi-label audit needs at least 4")
    probs[ids] = out_of_sample_probs(features[ids], targets[ids], max(2, min(folds, len(ids) // 2)), seed)
    sub = find_issues(probs[ids], targets[ids], names)  # indices into ids
    log.info("multi-label audit: %d of %d images flagged", len(sub.issues), len(ids))
    found = replace(sub, probs=probs, issues=ids[sub.issues])
    return label_issue_rows(ok, found, sep, names), probs, summary(sub, targets[ids], names)

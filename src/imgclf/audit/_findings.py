"""From scores to findings: one audit.csv row per (kind, image), each with the action it proposes.

Action policy (docs/audit.md), chosen so that applying an audit never flatters an evaluation:
- label issues in train/val: `drop` (`relabel` with --relabel) when the judge may act on them
  (_trust.drop_allowed), else `review`; in other splits (test): `review`, because a test set
  edited by a model's opinion would score that model higher;
- leakage: the train/val members of a group that also reaches another split are dropped, the
  test members kept, so the test set stays the same and stops being seen in training;
- conflicts, near-duplicates and outliers: `review` / `keep` (information; edit audit.csv to act);
- unreadable images: `drop`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from imgclf.audit._trust import DROP_SCORE, MIN_CLASS_ACCURACY, Judge, drop_allowed
from imgclf.auditdir import COLUMNS

FIT_SPLITS = ("train", "val")


def _rows(frame: pd.DataFrame, idx: np.ndarray, kind: str, **cols) -> pd.DataFrame:
    base = frame.iloc[idx]
    out = pd.DataFrame({
        "kind": kind, "row": base["row"].to_numpy(), "sha256": base["sha256"].to_numpy(),
        "path": base["path"].to_numpy(), "url": base["url"].to_numpy(), "split": base["split"].to_numpy(),
        "label": base["label"].to_numpy(), "suggested": "", "score": 0.0, "group": -1, "action": "review",
        "detail": ""})
    for name, value in cols.items():
        out[name] = value
    return out


def label_issue_rows(frame: pd.DataFrame, issues: np.ndarray, probs: np.ndarray, class_names: list[str],
                     relabel: bool, judge: Judge) -> pd.DataFrame:
    """`probs` are the calibrated out-of-sample probabilities: score = 1 - p(given), the estimated
    probability that the given label is wrong. Only what the judge may act on (_trust.drop_allowed)
    is proposed for drop / relabel; the rest for review, with the reason in `detail`."""
    if not len(issues):
        return _rows(frame, issues, "label_issue")
    names = np.array(class_names)
    given = np.array([class_names.index(x) for x in frame["label"].iloc[issues]])
    others = probs[issues].copy()
    others[np.arange(len(issues)), given] = -1.0  # the suggestion is the best *other* class
    suggested = others.argmax(axis=1)
    score = np.round(1.0 - probs[issues, given], 4)
    fit = frame["split"].iloc[issues].isin(FIT_SPLITS).to_numpy()
    allowed = drop_allowed(judge, given, suggested, score)
    action = np.where(fit & allowed, "relabel" if relabel else "drop", "review")
    detail = [f"p(given)={probs[i, g]:.3f}, p(suggested)={probs[i, s]:.3f}"
              + ("" if ok or not f else "; review: " + _held_back(judge, g, s, sc, class_names))
              for i, g, s, sc, ok, f in zip(issues, given, suggested, score, allowed, fit, strict=True)]
    return _rows(frame, issues, "label_issue", suggested=names[suggested], score=score, action=action, detail=detail)


def _held_back(judge: Judge, given: int, suggested: int, score: float, class_names: list[str]) -> str:
    if not judge.trusted:
        return "the judge is too weak to drop (" + "; ".join(judge.reasons) + ")"
    if not judge.class_accuracy[given] >= MIN_CLASS_ACCURACY:
        return (f"the judge gets {class_names[given]} right {judge.class_accuracy[given]:.2f} of the time, "
                f"below {MIN_CLASS_ACCURACY:.2f}")
    return f"estimated probability of a wrong label {score:.2f} is below {DROP_SCORE:.2f}"


def group_rows(frame: pd.DataFrame, groups: np.ndarray, best_sim: np.ndarray) -> pd.DataFrame:
    """leakage / conflict / near_duplicate rows for every member of every group."""
    parts = []
    members = pd.DataFrame({"i": np.flatnonzero(groups >= 0)})
    if members.empty:
        return _rows(frame, np.array([], dtype=int), "near_duplicate")
    members["group"] = groups[members["i"]]
    members["split"] = frame["split"].to_numpy()[members["i"]]
    members["label"] = frame["label"].to_numpy()[members["i"]]
    per_group = members.groupby("group").agg(
        fit=("split", lambda s: bool(s.isin(FIT_SPLITS).any())),
        other=("split", lambda s: bool((~s.isin(FIT_SPLITS)).any())),
        labels=("label", "nunique"), size=("i", "size"))
    leaking = per_group.index[per_group["fit"] & per_group["other"]]
    conflicting = per_group.index[per_group["labels"] > 1]
    plain = per_group.index.difference(leaking.union(conflicting))
    for kind, ids in (("leakage", leaking), ("conflict", conflicting), ("near_duplicate", plain)):
        sel = members[members["group"].isin(ids)]
        if sel.empty:
            continue
        idx = sel["i"].to_numpy()
        if kind == "leakage":
            action = np.where(np.isin(sel["split"], FIT_SPLITS), "drop", "keep")
        else:
            action = np.full(len(idx), "review" if kind == "conflict" else "keep")
        sizes = per_group.loc[sel["group"], "size"].to_numpy()
        splits = members.groupby("group")["split"].agg(lambda s: "+".join(sorted(set(s))))
        labels = members.groupby("group")["label"].agg(lambda s: " | ".join(sorted(set(s))))
        detail = [f"{n} images; splits {splits[g]}; labels {labels[g]}"
                  for n, g in zip(sizes, sel["group"], strict=True)]
        parts.append(_rows(frame, idx, kind, group=sel["group"].to_numpy(), score=np.round(best_sim[idx], 4),
                           action=action, detail=detail))
    return pd.concat(parts, ignore_index=True)


def outlier_rows(frame: pd.DataFrame, flagged: np.ndarray, distance: np.ndarray, zscore: np.ndarray,
                 confidence: np.ndarray, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    names = np.array(class_names)
    detail = [f"mean cosine distance to neighbours {distance[i]:.3f} (modified z {zscore[i]:.1f}); "
              f"max probability {confidence[i]:.2f}" for i in flagged]
    return _rows(frame, flagged, "outlier", score=np.round(np.clip(distance[flagged], 0, 1), 4),
                 suggested=names[probs[flagged].argmax(axis=1)] if len(flagged) else [], detail=detail)


def unreadable_rows(frame: pd.DataFrame, unreadable: np.ndarray) -> pd.DataFrame:
    return _rows(frame, unreadable, "unreadable", score=1.0, action="drop", detail="cannot be decoded")


def assemble(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """All findings in COLUMNS order: by kind (as in KINDS' order of importance), then score, row."""
    order = {"label_issue": 0, "leakage": 1, "conflict": 2, "near_duplicate": 3, "outlier": 4, "unreadable": 5}
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) \
        else pd.DataFrame({c: [] for c in COLUMNS})
    frame["_k"] = frame["kind"].map(order)
    frame = frame.sort_values(["_k", "group", "score", "row"], ascending=[True, True, False, True], kind="stable")
    return frame[list(COLUMNS)].reset_index(drop=True)

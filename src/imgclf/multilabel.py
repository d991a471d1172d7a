"""Multi-label core: label sets <-> indicator matrices, thresholds, and sets <-> reported labels.

`task: multilabel` (config) gives each image a *set* of labels. The manifest keeps the label cell
as text (`dress|red|outdoor`); `parse_labels` splits it with `data.label_sep` at train and evaluate
time, `encode` turns sets into the (N, C) {0, 1} targets of a sigmoid model, `choose_thresholds`
picks one threshold per label on the validation split (stored in the checkpoint), and `decode`
turns probabilities (`sigmoid(logits)`) back into the labels above their thresholds.

`merge_by_content` and `stratified_split` are the data side (data.make_split calls them).
A core module: numpy, pandas and scikit-learn only, no stage imported (predict, serve, export, evaluate and
train all use it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from imgclf.errors import DataError

TASK = "multilabel"  # the value of `task` in configs and in checkpoint / export metadata
SINGLE_LABEL = "single_label"
DEFAULT_THRESHOLD = 0.5  # a label with no positive in validation keeps this one


def is_multilabel(meta: dict | None) -> bool:
    """Whether checkpoint or export metadata describe a multi-label model (absent `task` = single-label)."""
    return bool(meta) and meta.get("task") == TASK


def parse_labels(cell: object, sep: str = "|") -> tuple[str, ...]:
    """The label set of one cell, sorted, without duplicates or blanks: `"red| dress|red"` ->
    `("dress", "red")`. An empty or missing cell is the empty set (an image with no label)."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return ()
    if isinstance(cell, (list, tuple, np.ndarray)):  # a list column read as such
        parts: Iterable[object] = cell
    else:
        parts = str(cell).split(sep)
    return tuple(sorted({str(p).strip() for p in parts if str(p).strip()}))


def join_labels(labels: Iterable[str], sep: str = "|") -> str:
    """The cell text of a label set (sorted, so equal sets give equal cells)."""
    return sep.join(sorted(set(labels)))


def vocabulary(sets: Iterable[Sequence[str]]) -> list[str]:
    """The sorted labels that occur in any set: a multi-label model's `classes`."""
    return sorted({label for labels in sets for label in labels})


def encode(sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """(N, C) uint8 indicator matrix: row i has a 1 in column j when classes[j] is in sets[i].
    A label outside `classes` is a DataError naming it (the model cannot score it)."""
    index = {name: j for j, name in enumerate(classes)}
    out = np.zeros((len(sets), len(classes)), dtype=np.uint8)
    for i, labels in enumerate(sets):
        for label in labels:
            j = index.get(label)
            if j is None:
                shown = ", ".join(map(repr, list(classes)[:20])) + (", ..." if len(classes) > 20 else "")
                raise DataError(f"label {label!r} (row {i}) is not known to the model; "
                                f"its {len(classes)} labels: {shown}")
            out[i, j] = 1
    return out


def decode(probs: np.ndarray, classes: Sequence[str], thresholds: Sequence[float],
           top_k: int | None = None) -> list[list[tuple[str, float]]]:
    """Per row, the (label, probability) pairs whose probability is >= the label's threshold,
    highest first; at most `top_k` of them when given."""
    probs = np.asarray(probs, dtype=np.float64)
    above = probs >= np.asarray(thresholds, dtype=np.float64)[None, :]
    out = []
    for row, keep in zip(probs, above, strict=True):
        picked = np.flatnonzero(keep)
        # Stable sort on -score: ties keep the vocabulary's order, so output is deterministic.
        picked = picked[np.argsort(-row[picked], kind="stable")]
        if top_k is not None:
            picked = picked[:top_k]
        out.append([(classes[j], float(row[j])) for j in picked])
    return out


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """One threshold per label: the probability cut that maximises that label's F1 on (validation)
    `probs` (N, C) against `targets` (N, C); DEFAULT_THRESHOLD where a label has no positive.

    The cut is placed halfway between the lowest kept score and the next lower score, so a score a
    hair below the lowest validation positive (other images, other hardware) is not flipped."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    return [_best_cut(probs[:, j], targets[:, j]) for j in range(probs.shape[1])]


def _best_cut(scores: np.ndarray, positive: np.ndarray) -> float:
    n_pos = int(positive.sum())
    if n_pos == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order]
    tp = np.cumsum(hits)
    kept = np.arange(1, len(ranked) + 1)
    f1 = 2 * tp / (kept + n_pos)
    # Only cut between distinct scores: equal scores are kept or dropped together.
    distinct = np.append(ranked[1:] < ranked[:-1], True)
    best = int(np.flatnonzero(distinct)[np.argmax(f1[distinct])])
    lower = ranked[best + 1] if best + 1 < len(ranked) else 0.0
    return float((ranked[best] + lower) / 2)


def frequencies(targets: np.ndarray) -> np.ndarray:
    """Share of images carrying each label: the frequency baseline's scores."""
    targets = np.asarray(targets, dtype=np.float64)
    return targets.mean(axis=0) if len(targets) else np.zeros(targets.shape[1])


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities of a multi-label model's logits (float64, no overflow warnings)."""
    logits = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


# ---- the data side: manifest rows -> one sample per image with its label set, and the split ---------
def merge_by_content(rows: pd.DataFrame, sep: str) -> pd.DataFrame:
    """One row per stored image (sha256) from manifest rows with status ok or duplicate: the first
    ok row (its row number, path, split) carrying the union of every copy's label set, joined with
    `sep`. This is what makes "the same photo in the `red/` and the `dress/` folder" one image
    labelled {dress, red}, and a list that names a URL twice with different tags one sample."""
    if rows.empty:
        return rows.copy()
    rows = rows.assign(_set=[parse_labels(cell, sep) for cell in rows["label"].tolist()])
    # A row without a hash (old manifests) is its own group.
    key = rows["sha256"].where(rows["sha256"] != "", "row:" + rows["row"].astype(str))
    merged = rows.groupby(key, sort=False)["_set"].agg(lambda sets: join_labels(
        (label for labels in sets for label in labels), sep))
    first_ok = rows[rows["status"] == "ok"].assign(_key=key).drop_duplicates("_key")
    out = first_ok.assign(label=first_ok["_key"].map(merged)).drop(columns=["_set", "_key"])
    return out.reset_index(drop=True)


def stratified_split(sets: Sequence[Sequence[str]], val_fraction: float, seed: int) -> np.ndarray:
    """True where an image goes to validation: iterative stratification on the label sets (Sechidis
    et al. 2011, the `iterative-stratification` package), so each label's share, rare labels
    first, is about the same in train and validation; images without labels are spread too."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(sets)
    is_val = np.zeros(n, dtype=bool)
    if n < 2:
        return is_val
    # A column for "no label": type_of_target needs 2+ columns, and unlabelled images are spread too.
    targets = encode(sets, vocabulary(sets))
    targets = np.hstack([targets, (targets.sum(axis=1) == 0)[:, None].astype(np.uint8)])
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    _, val_idx = next(splitter.split(np.zeros((n, 1)), targets))
    is_val[val_idx] = True
    return is_val


def thresholds_of(meta: dict | None, classes: Sequence[str], where: object) -> list[float] | None:
    """A multi-label model's per-label thresholds from its checkpoint or export metadata, checked
    (one per class, each in [0, 1]); None for a single-label model. DataError (one line naming the
    file) when the metadata says multilabel but the thresholds cannot be used: a model file may come
    from anyone, and a wrong-length list would silently shift every label's cut."""
    if not is_multilabel(meta):
        return None
    values = meta.get("thresholds")  # type: ignore[union-attr]
    if not isinstance(values, list | tuple) or len(values) != len(classes):
        got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
        raise DataError(f"{where}: multilabel metadata needs 'thresholds', one per class ({len(classes)}); got {got}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values):
        raise DataError(f"{where}: multilabel 'thresholds' must be numbers between 0 and 1")
    return [float(v) for v in values]

"""The audit directory contract: what `imgclf audit` writes, and how later stages read its findings.

This is to AUDIT_DIR what `manifest.py` is to DATA_DIR (core layer: train's `data.exclude` and
the audit's `--apply` both read audit.csv through here, so neither imports the audit stage).

    audit.csv      one row per finding, columns COLUMNS below (docs/audit.md)
    audit.json     summary: counts, class summaries, settings, timing
    audit.html     self-contained gallery (thumbnails as data URIs, no scripts)
    decisions.csv  what a person chose in `imgclf audit --review` (keep / relabel / drop per row)
    cache/         embeddings and perceptual hashes keyed by model and image sha256 (reused by a rerun)
    embedder/      the run directory of the model trained for the audit (when no --model was given)

audit.csv rows name a manifest `row` and its `sha256`, so a finding can never be applied to
another image: a manifest rebuilt since the audit is refused row by row, not silently misread.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from imgclf._files import atomic_path
from imgclf.csvfile import write_frame
from imgclf.errors import DataError
from imgclf.untrusted import csv_raw_frame

CSV = "audit.csv"
JSON = "audit.json"
HTML = "audit.html"
DECISIONS = "decisions.csv"
CACHE = "cache"
EMBEDDER = "embedder"

# Stable column order of audit.csv; later versions may append columns, never rename these.
COLUMNS = ("kind", "row", "sha256", "path", "url", "split", "label", "suggested", "score", "group",
           "action", "detail")

KINDS: dict[str, str] = {
    "label_issue": "the given label is probably wrong (cleanlab on out-of-sample probabilities); "
                   "suggested = the most probable other class",
    "leakage": "a near-duplicate of this image is in another split (train/val vs test)",
    "conflict": "near-duplicates with different labels",
    "near_duplicate": "near-duplicates within one split and label",
    "outlier": "unlike every class: far from its nearest neighbours in embedding space",
    "unreadable": "the stored image cannot be decoded any more",
}

# What `imgclf audit --apply` and train's `data.exclude` do with a row.
ACTIONS: dict[str, str] = {
    "drop": "left out of training (--apply: status 'excluded'; data.exclude: not in the training pool)",
    "relabel": "--apply sets the label to `suggested`; data.exclude leaves the row out",
    "review": "no automatic change: look at it (audit.html)",
    "keep": "no change",
}
# Rows that data.exclude takes out of the training pool.
EXCLUDING_ACTIONS = frozenset({"drop", "relabel"})


# decisions.csv (written by the review screen, one row per decided manifest row, the latest decision).
DECISION_COLUMNS = ("row", "sha256", "action", "new_label", "decided_at")
DECISION_ACTIONS: dict[str, str] = {
    "keep": "no change",
    "relabel": "data.exclude: the row is trained with `new_label`",
    "drop": "data.exclude: the row is left out of training",
}


def read_findings(path: str | Path) -> pd.DataFrame:
    """audit.csv (or decisions.csv) as a frame; DataError naming the file for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such audit file (write one with `imgclf audit --data DATA_DIR --out DIR`)")
    try:
        frame = pd.read_csv(path, dtype={"sha256": str, "path": str, "label": str, "suggested": str,
                                         "action": str, "kind": str, "new_label": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: not a readable CSV ({err.__class__.__name__})") from None
    # audit.csv's text cells were written spreadsheet-safe (imgclf.csvfile): back to the raw values.
    frame = csv_raw_frame(frame, ("path", "url", "split", "label", "suggested", "detail", "new_label"))
    if "row" not in frame:
        raise DataError(f"{path}: no 'row' column (expected audit.csv columns: {', '.join(COLUMNS)})")
    rows = pd.to_numeric(frame["row"], errors="coerce")
    bad = rows.isna() | (rows < 0) | (rows != rows.round())
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0]) + 2  # header is line 1
        raise DataError(f"{path}: line {line}: 'row' must be a manifest row number, "
                        f"got {frame['row'].iloc[line - 2]!r}")
    frame["row"] = rows.astype("int64")
    if "action" in frame:
        unknown = sorted(set(frame["action"]) - set(ACTIONS) - {""})
        if unknown:
            raise DataError(f"{path}: unknown action(s) {', '.join(map(repr, unknown[:3]))} "
                            f"(use {', '.join(ACTIONS)})")
    return frame


def check_against_manifest(findings: pd.DataFrame, manifest: pd.DataFrame, origin: str | Path) -> None:
    """Every finding's row exists and (when audit.csv gives it) still holds the same image."""
    by_row = manifest.set_index("row")["sha256"]
    missing = findings.loc[~findings["row"].isin(by_row.index), "row"]
    if not missing.empty:
        raise DataError(f"{origin}: manifest row {int(missing.iloc[0])} does not exist in this data directory "
                        f"({len(missing)} such row(s)); was the audit made for another DATA_DIR?")
    if "sha256" in findings:
        given = findings[findings["sha256"] != ""]
        moved = given[given["sha256"].to_numpy() != by_row.loc[given["row"]].to_numpy()]
        if not moved.empty:
            raise DataError(f"{origin}: manifest row {int(moved['row'].iloc[0])} now holds another image than when "
                            f"audited ({len(moved)} such row(s)); re-run `imgclf audit`")


def is_decisions(frame: pd.DataFrame) -> bool:
    """A review's decisions.csv (it has `new_label`), not an audit.csv or a hand-made row list."""
    return "new_label" in frame


def excluded_rows(path: str | Path, manifest: pd.DataFrame) -> set[int]:
    """Manifest rows that `data.exclude: PATH` keeps out of training.

    PATH is an audit.csv (rows whose action is drop or relabel), a review's decisions.csv (rows
    whose action is drop; its relabel rows stay, with their new label: `relabelled_rows`), or any
    CSV with a `row` column (every listed row; e.g. a hand-made list).
    """
    findings = read_findings(path)
    check_against_manifest(findings, manifest, path)
    if is_decisions(findings):
        findings = findings[findings["action"] == "drop"]
    elif "action" in findings:
        findings = findings[findings["action"].isin(EXCLUDING_ACTIONS)]
    return set(findings["row"].tolist())


def relabelled_rows(path: str | Path, manifest: pd.DataFrame) -> dict[int, str]:
    """{manifest row: new label} of a decisions.csv's relabel rows; {} for any other exclude CSV.

    A new label that no usable image of the data carries is a one-line DataError: training would
    otherwise grow a class from one person's typo.
    """
    frame = read_findings(path)
    if not is_decisions(frame):
        return {}
    check_against_manifest(frame, manifest, path)
    frame = frame[frame["action"] == "relabel"]
    known = set(manifest.loc[manifest["status"] == "ok", "label"]) if "status" in manifest else set(manifest["label"])
    for row, label in zip(frame["row"], frame["new_label"], strict=True):
        if label not in known:
            raise DataError(f"{path}: row {int(row)}: relabel to {label!r}, which is not a class of this data "
                            f"({', '.join(sorted(known)[:8])})")
    return dict(zip(frame["row"].astype(int).tolist(), frame["new_label"].tolist(), strict=True))


def write_decisions(frame: pd.DataFrame, audit_dir: str | Path) -> Path:
    """AUDIT_DIR/decisions.csv, atomically (a crash mid-write leaves the previous file), spreadsheet-safe."""
    path = Path(audit_dir) / DECISIONS
    with atomic_path(path) as tmp:
        write_frame(frame.loc[:, list(DECISION_COLUMNS)], tmp, index=False)
    return path

"""Evaluate's inputs from a manifest written as parts (more than manifest.PART_ROWS rows), without
one frame of every row: the evaluated split's rows only (filters pushed down to the parts, only
the columns needed), the training shares and the data summary from streaming passes that keep
counts, never rows.

What still grows with the evaluated split: its rows (row, path, label, url), the per-image
probabilities (images x classes), predictions.csv and the bootstrap's resamples, all of which the
metrics and the report need whole. So the evaluated split is bounded: above MAX_IMAGES usable
images evaluate refuses in one line, and `--sample N` evaluates a seeded sample of about N of them
instead (per image by a seeded hash of its sha256, hashsplit.ValRule, so the same images every time). At
2,000,000 images the 95% interval of accuracy is about +-0.0007 wide: a larger test set changes
no decision, and the probabilities of 1,000 classes already take 8 GB.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf import manifest
from imgclf.errors import DataError
from imgclf.hashsplit import ValRule, subset_label_counts

log = logging.getLogger("imgclf.evaluate")

MAX_IMAGES = 2_000_000  # usable images evaluate holds at once (see the module docstring)
COLUMNS = ["row", "path", "label", "url", "sha256"]


def _rows(data_dir: Path | str, split: str, keep: Any = None) -> pd.DataFrame:
    """The usable rows of `split` (COLUMNS) that `keep` (a function of a batch, a boolean mask) keeps."""
    frames = []
    for batch in manifest.scan_batches(data_dir, COLUMNS, split=split, status="ok"):
        frames.append(batch if keep is None else batch[keep(batch)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "row" else "string") for c in COLUMNS})
    frame = pd.concat(frames, ignore_index=True)
    return frame.fillna("").astype({"row": "int64", "path": str, "label": str, "url": str, "sha256": str})


def _bounded(data_dir: Path | str, split: str, n: int, sample: int | None, seed: int, what: str) -> Any:
    """A `keep` that samples about `sample` of `n` rows, or None (all); refuses n > MAX_IMAGES unsampled."""
    if sample is not None and n > sample:
        rule = ValRule(seed, sample / n)
        log.info("evaluating a seeded sample of about %d of the %d images of %s", sample, n, what)
        return lambda batch: rule.is_val(batch["sha256"].tolist())
    if n > MAX_IMAGES:
        raise DataError(f"{data_dir}: {what} has {n:,} usable images, more than evaluate holds in memory "
                        f"({MAX_IMAGES:,}: per-image probabilities, predictions.csv); evaluate a seeded sample "
                        f"with --sample {MAX_IMAGES}")
    return None


def eval_rows(data_dir: Path | str, split: str, run_info: dict[str, Any], sample: int | None,
              seed: int) -> tuple[pd.DataFrame, str, str, str]:
    """(rows, split evaluated, where they came from, note): the split's usable rows, or for test/val
    without any, the run's validation rows as its run.json `split_rule` says."""
    n = manifest.count_rows(data_dir, split, "ok")
    if n:
        keep = _bounded(data_dir, split, n, sample, seed, f"split '{split}'")
        return _rows(data_dir, split, keep), split, "manifest", ""
    rule = run_info.get("split_rule") or {}
    if split in ("test", "val") and rule.get("kind") in ("hash", "manifest"):
        if rule["kind"] == "manifest":
            frame, _, _, _ = eval_rows(data_dir, "val", {}, sample, seed)
            source = "run split_rule (the manifest's split 'val')"
        else:
            val = ValRule.from_json(rule, "run.json")
            n_val = int(rule.get("val_rows") or manifest.count_rows(data_dir, "train", "ok"))
            sampled = _bounded(data_dir, "train", n_val, sample, seed, "the run's validation subset")

            def keep(batch: pd.DataFrame) -> Any:
                side = val.is_val(batch["sha256"].tolist())
                return side & sampled(batch) if sampled is not None else side

            frame = _rows(data_dir, "train", keep)
            source = f"run split_rule ({rule['hash']}, seed {val.seed}, val_fraction {val.fraction})"
        note = (f"no '{split}' images in {data_dir}: evaluating on the run's validation subset "
                f"({len(frame)} images, the ones that chose the best checkpoint, so expect optimistic figures)")
        log.warning(note)
        return frame, "val", source, note
    have = sorted({s for batch in manifest.scan_batches(data_dir, ["split"], status="ok")
                   for s in batch["split"].unique()})
    fallback = ", and no run validation subset to fall back on" if split in ("test", "val") else ""
    raise DataError(f"{data_dir}: no downloaded images with split '{split}' (splits here: "
                    f"{', '.join(have) or 'none'}){fallback}")


def train_counts(data_dir: Path | str, run_info: dict[str, Any]) -> tuple[dict[str, int], str]:
    """Label counts of what the model trained on, from one streaming pass, and where they came from."""
    rule = run_info.get("split_rule") or {}
    if rule.get("kind") == "hash":
        counts = subset_label_counts(data_dir, ValRule.from_json(rule, "run.json"))["train"]
        return counts, "run split_rule (train side)"
    counts = Counter()
    for batch in manifest.scan_batches(data_dir, ["label"], split="train", status="ok"):
        counts.update(batch["label"].value_counts().to_dict())
    return {str(k): int(v) for k, v in counts.items()}, "manifest split 'train'"


def data_summary(data_dir: Path | str, split: str) -> dict[str, Any]:
    """evaluate's `data` block from streaming passes: counts per status and per (label, split), and
    leakage for the evaluated split only (its sha256 set against the train/val rows, streamed)."""
    status: Counter[str] = Counter()
    classes: Counter[tuple[str, str]] = Counter()
    for batch in manifest.scan_batches(data_dir, ["status", "split", "label"]):
        status.update(batch["status"].value_counts().to_dict())
        ok = batch[batch["status"] == "ok"]
        classes.update(ok.groupby(["label", "split"]).size().to_dict())
    found, evaluated = {}, {}
    if split not in ("train", "val"):
        found[split], evaluated[split] = _leakage(data_dir, split)
    class_counts: dict[str, dict[str, int]] = {}
    for (label, where), n in sorted(classes.items()):
        class_counts.setdefault(str(label), {})[str(where)] = int(n)
    return {"rows": int(sum(status.values())), "status_counts": {k: int(v) for k, v in status.items()},
            "class_counts": class_counts, "duplicates": int(status.get("duplicate", 0)),
            "leakage_found": found, "leakage_evaluated": evaluated}


def _leakage(data_dir: Path | str, split: str) -> tuple[int, int]:
    """Rows of `split` (ok or duplicate) whose content is in train/val rows (any; ok ones: evaluated)."""
    held = pd.concat([b for b in manifest.scan_batches(data_dir, ["sha256", "status"], split=split)]
                     or [pd.DataFrame({"sha256": [], "status": []})], ignore_index=True)
    held = held[held["status"].isin(["ok", "duplicate"]) & (held["sha256"] != "")]
    wanted = set(held["sha256"])
    seen_any: set[str] = set()
    seen_ok: set[str] = set()
    for fit in ("train", "val"):
        for batch in manifest.scan_batches(data_dir, ["sha256", "status"], split=fit):
            hit = batch[batch["sha256"].isin(wanted) & batch["status"].isin(["ok", "duplicate"])]
            seen_any.update(hit["sha256"])
            seen_ok.update(hit.loc[hit["status"] == "ok", "sha256"])
    ok = held["status"] == "ok"
    return int(held["sha256"].isin(seen_any).sum()), int(held.loc[ok, "sha256"].isin(seen_ok).sum())

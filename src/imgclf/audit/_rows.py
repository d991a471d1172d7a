"""The rows an audit reads: every usable row of DATA_DIR, up to MAX_IMAGES, or a seeded sample.

The audit's analysis holds all its images at once: 2 KB of float16 embedding per image, and the
label head's float32 copies of them in scikit-learn's scaler, PCA and cross-validation (4-8 KB per
image each; docs/benchmarks.md, issue 27 item 4). At MAX_IMAGES that is already about 10 GB, so
above it the audit refuses in one line that names the size and the way out, `--sample N`: a
seeded sample of about N images, chosen per image by a hash of its sha256 (hashsplit.ValRule), so the
same images every time and copies of one image together. A manifest written as parts is counted
and sampled by streaming passes (manifest.scan_arrow), never read whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from imgclf import manifest
from imgclf.errors import DataError
from imgclf.hashsplit import ValRule
from imgclf.untrusted import check_labels

log = logging.getLogger("imgclf.audit")

MAX_IMAGES = 1_000_000


def _sampler(data: Path | str, n: int, sample: int | None, seed: int) -> ValRule | None:
    """The per-image rule keeping about `sample` of `n` rows; None for all (refused above MAX_IMAGES)."""
    if sample is not None and n > sample:
        log.info("auditing a seeded sample of about %d of the %d usable images (--sample)", sample, n)
        return ValRule(seed, sample / n)
    if n > MAX_IMAGES:
        raise DataError(f"{data}: {n:,} usable images, more than the audit analyses at once ({MAX_IMAGES:,}: "
                        f"embeddings and the label head's copies of them are held in memory); audit a seeded "
                        f"sample with --sample {MAX_IMAGES}")
    return None


def usable(data: Path | str, sample: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The usable (status ok) rows to audit, every column, typed as the manifest contract says."""
    if not manifest.is_parts(data):
        ok = manifest.usable_rows(manifest.read_manifest(data))
        rule = _sampler(data, len(ok), sample, seed)
        return ok if rule is None else ok[rule.is_val(ok["sha256"].tolist())].reset_index(drop=True)
    n = manifest.count_rows(data, status="ok")
    rule = _sampler(data, n, sample, seed)
    if rule is None:
        return manifest.scan(data, status="ok")
    frames = [t.filter(rule.is_val(t["sha256"])).to_pandas()
              for t in manifest.scan_arrow(data, list(manifest.COLUMNS), status="ok")]
    frame = manifest.normalize(pd.concat(frames, ignore_index=True))
    check_labels(frame["label"], lambda i: f"{data}: row {frame['row'].iloc[i]}")
    return frame

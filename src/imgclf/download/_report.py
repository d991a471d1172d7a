"""Write manifest.parquet and download_report.json from the resume state, and print the summary.

The manifest is streamed in row order in batches (bounded memory for millions of rows) and
written atomically (`_files.atomic_path`): a temporary file renamed over the previous manifest.
More than `manifest.PART_ROWS` rows are written as parts (`_Parts`): files of one write in a
folder of their own, published by replacing `manifest/_index.json` (see imgclf.manifest).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgclf import manifest as _manifest
from imgclf._files import atomic_path, write_atomic
from imgclf.download._state import INVALID_PREFIX, State
from imgclf.images import too_large_kind
from imgclf.manifest import COLUMNS, MANIFEST_NAME, PARTS_DIR, PARTS_INDEX, REPORT_NAME, STATUSES, normalize

_EXAMPLES = 20


def _resolve(rec: tuple, keep_unlabelled: bool = False) -> tuple:
    """One manifest row from a state row: expands same-URL and same-content duplicates.
    `keep_unlabelled` (--label-sep): an empty label is an image without labels, not missing_label."""
    (row, source, url, label, split, status, error, http_status, attempts, sha, path, width, height,
     size, url_first, sha_first, shard, offset) = rec
    duplicate_of = -1
    url = url.removeprefix(INVALID_PREFIX)  # see _state._url_key
    if not label and not keep_unlabelled:  # never fetched for this row: no URL outcome applies
        status, error, http_status, attempts = "missing_label", "the row has no label", 0, 0
    elif status is None:
        status, error = "pending", "not attempted yet (interrupted run)"
    elif row != url_first:
        attempts = 0  # fetched once, for the first row with this URL
        if status == "ok":
            status, duplicate_of, error = "duplicate", sha_first, f"same URL as row {url_first}"
        else:
            error = f"same URL as row {url_first}: {error}"
    elif status == "ok" and sha_first is not None and sha_first != row:
        status, duplicate_of, error = "duplicate", sha_first, f"same image as row {sha_first}"
    if status not in ("ok", "duplicate"):
        sha, path, width, height, size, shard, offset = "", "", 0, 0, 0, "", -1
    return (row, source, url, label, split, status, error, http_status, attempts, sha, path, width, height,
            size, duplicate_of, shard, offset)


def write_outputs(state: State, data_dir: Path, extra: dict[str, Any], parts: bool = True
                  ) -> tuple[Path, Path, dict[str, Any]]:
    """Stream the manifest, gather counts on the way, write the report; return both paths and the report.
    `parts=False` (an object-storage --out, whose readers take one manifest object): always one file."""
    counts: Counter[str] = Counter()
    by_split: dict[str, Counter[str]] = {}
    by_label: dict[tuple[str, str], Counter[str]] = {}
    duplicates = Counter()
    too_large: Counter[str] = Counter()  # why, by kind (images.too_large_kind)

    def add(resolved: list[tuple]) -> pa.Table:
        # Counted from the tuples: iterating the frame's Arrow-backed columns costs 3x more.
        for _, _, _, label, split, status, error, *_ in resolved:
            counts[status] += 1
            by_split.setdefault(split, Counter())[status] += 1
            by_label.setdefault((split, label), Counter())[status] += 1
            if status == "too_large":
                too_large[too_large_kind(error)] += 1
            if status == "duplicate":
                duplicates["same_url" if error.startswith("same URL") else "same_content"] += 1
        return pa.Table.from_pandas(normalize(pd.DataFrame(resolved, columns=list(COLUMNS))), preserve_index=False)

    batches = (add([_resolve(rec, state.keep_unlabelled) for rec in batch]) for batch in state.manifest_rows())
    if parts and state.row_count() > _manifest.PART_ROWS:
        manifest = _Parts(data_dir, _manifest.PART_ROWS).write(batches)
    else:
        manifest = _write_one(data_dir / MANIFEST_NAME, batches)
        _Parts.remove(data_dir)  # a manifest written as parts before: this one replaces it

    report = {
        "total_rows": sum(counts.values()),
        "counts": {status: counts.get(status, 0) for status in STATUSES if counts.get(status, 0)},
        "statuses": STATUSES,
        "by_split": {split: dict(c) for split, c in sorted(by_split.items())},
        "by_split_label": [{"split": s, "label": lab, **dict(c)} for (s, lab), c in sorted(by_label.items())],
        "duplicates": {"same_url": duplicates["same_url"], "same_content": duplicates["same_content"]},
        "too_large_kinds": dict(too_large.most_common()),
        **_shared_images(state),
        **extra,
    }
    report_path = write_atomic(data_dir / REPORT_NAME, json.dumps(report, indent=2, default=str))
    return manifest, report_path, report


def _write_one(manifest: Path, tables: Iterator[pa.Table]) -> Path:
    with atomic_path(manifest) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            if writer is None:  # no rows at all: still a valid, empty manifest
                table = pa.Table.from_pandas(normalize(pd.DataFrame(columns=list(COLUMNS))), preserve_index=False)
                writer = pq.ParquetWriter(tmp, table.schema)
        finally:
            if writer is not None:
                writer.close()  # before atomic_path renames it (or removes it, on an error)
    return manifest


class _Parts:
    """A manifest as parts of `rows` rows: DATA_DIR/manifest/<write id>/part-NNNNN.parquet, published
    by replacing manifest/_index.json (the commit point: killed before it, the previous manifest
    stands); then manifest.parquet and the folders of earlier writes are removed."""

    def __init__(self, data_dir: Path, rows: int) -> None:
        self.data_dir, self.rows = data_dir, rows
        self.folder = data_dir / PARTS_DIR / uuid.uuid4().hex[:12]
        self.parts: list[dict[str, Any]] = []

    def write(self, tables: Iterator[pa.Table]) -> Path:
        self.folder.mkdir(parents=True)
        writer: pq.ParquetWriter | None = None
        try:
            for table in tables:
                while table.num_rows:
                    if writer is None:
                        name = f"part-{len(self.parts):05d}.parquet"
                        writer = pq.ParquetWriter(self.folder / name, table.schema, compression="zstd")
                        self.parts.append({"path": f"{self.folder.name}/{name}", "rows": 0})
                    chunk = table.slice(0, self.rows - self.parts[-1]["rows"])
                    writer.write_table(chunk)
                    self.parts[-1]["rows"] += chunk.num_rows
                    table = table.slice(chunk.num_rows)
                    if self.parts[-1]["rows"] == self.rows:
                        writer.close()
                        writer = None
        except BaseException:
            if writer is not None:
                writer.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        if writer is not None:
            writer.close()
        index = {"parts": self.parts, "total_rows": sum(p["rows"] for p in self.parts)}
        path = write_atomic(self.folder.parent / PARTS_INDEX, json.dumps(index, indent=1))
        (self.data_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for old in self.folder.parent.iterdir():
            if old.is_dir() and old != self.folder:
                shutil.rmtree(old, ignore_errors=True)
        return path.parent

    @staticmethod
    def remove(data_dir: Path) -> None:
        """Drop a parts manifest (its index first: from then on it is no manifest)."""
        (data_dir / PARTS_DIR / PARTS_INDEX).unlink(missing_ok=True)
        shutil.rmtree(data_dir / PARTS_DIR, ignore_errors=True)


def _shared_images(state: State) -> dict[str, Any]:
    """Same image under several splits (train/test leakage) or several labels (label noise)."""
    leak = {"images": 0, "rows": 0, "examples": []}
    conflict = {"images": 0, "rows": 0, "examples": []}
    for sha, n_splits, n_labels, first_row, n_rows, splits, labels in state.shared_images():
        example = {"sha256": sha, "first_row": first_row, "rows": n_rows,
                   "splits": sorted(splits.split(",")), "labels": sorted(labels.split(","))}
        for kind, hit in ((leak, n_splits > 1), (conflict, n_labels > 1)):
            if hit:
                kind["images"] += 1
                kind["rows"] += n_rows
                if len(kind["examples"]) < _EXAMPLES:
                    kind["examples"].append(example)
    return {"leakage": leak, "label_conflicts": conflict}


def print_summary(report: dict[str, Any], console: Any) -> None:
    """The end-of-run table: one line per status, then duplicates and leakage."""
    from rich.table import Table

    table = Table(title=f"imgclf download: {report['total_rows']} rows", title_justify="left")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("meaning")
    total = max(1, report["total_rows"])
    for status, n in sorted(report["counts"].items(), key=lambda kv: (kv[0] != "ok", -kv[1])):
        table.add_row(status, str(n), f"{100 * n / total:.1f}%", STATUSES.get(status, ""))
    console.print(table)
    if report["counts"].get("tls_error"):
        console.print(f"[bold yellow]tls_error:[/] {report['counts']['tls_error']} row(s) met a certificate this "
                      "system does not trust; for a private CA run again with SSL_CERT_FILE=/path/to/ca.pem "
                      "and --retry-failed (never turn verification off)")
    if kinds := report.get("too_large_kinds"):
        why = "; ".join(f"{n} {kind}" for kind, n in kinds.items())
        console.print(f"[yellow]too_large:[/] {sum(kinds.values())} image(s) refused: {why} (each row's error "
                      "in the manifest says more)")
    leak = report["leakage"]
    if leak["images"]:
        console.print(f"[bold yellow]leakage:[/] {leak['images']} image(s) appear in more than one split "
                      f"({leak['rows']} rows); see leakage.examples in download_report.json")
    conflicts = report["label_conflicts"]
    if conflicts["images"] and report.get("label_sep") is not None:  # multi-label data: expected, merged later
        console.print(f"multi-label: {conflicts['images']} image(s) appear under several labels; task: multilabel "
                      "trains each once with the union of its labels")
    elif conflicts["images"]:
        console.print(f"[yellow]label conflicts:[/] {conflicts['images']} image(s) carry more than one label")
    skipped = report.get("skipped") or {}
    if skipped.get("total"):
        kinds = ", ".join(f"{n} {kind}" for kind, n in skipped["by_kind"].items())
        console.print(f"[yellow]skipped:[/] {skipped['total']} local file(s) with no row ({kinds}); "
                      "see skipped in download_report.json")
    if "images_per_s" in report:
        console.print(f"processed {report.get('fetched_this_run', 0)} URL(s) or file(s) "
                      f"in {report.get('fetch_s', 0):.1f}s "
                      f"({report['images_per_s']:.1f} ok images/s)")

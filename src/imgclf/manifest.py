"""The data manifest: `DATA_DIR/manifest.parquet`, one row per input row.

This is the contract between `download` and every later stage (train, evaluate,
predict). Columns, in order, with their meaning:

    row           int    0-based index of the row over all inputs, in input order
    source        str    the input the row came from: a table, a folder or an archive, as given
    url           str    as given; for a local source, the file's locator: the folder as given
                         joined with the file's path in it (`photos/train/cat/1.jpg`), a table's
                         `path` joined to the table's folder, or `archive!member` for an archive
                         member (`pics.zip!train/cat/1.jpg`)
    label         str    as given (stripped); for folders and archives the class folder's name verbatim
    split         str    from the `split` column or split folder (train/val/test), else the source's
                         name (train/val/test), else "train"
    status        str    "ok" or one of STATUSES (why the row has no usable image)
    error         str    human-readable reason ("" when ok)
    http_status   int    last HTTP status seen (0 when no response, and for local rows)
    attempts      int    HTTP attempts made for this row (0 for local rows)
    sha256        str    sha256 of the stored image file ("" when none)
    path          str    stored file, relative to DATA_DIR ("" when none)
    width, height int    stored image size (0 when none)
    bytes         int    stored file size (0 when none)
    duplicate_of  int    for status "duplicate": the row whose image this row repeats, else -1
    shard         str    `download --layout tar`: the tar holding the image, relative to DATA_DIR
                         (`shards/00007.tar`); "" when the image is a plain file at `path`
    offset        int    `--layout tar`: byte offset of the image's data inside `shard` (its size is
                         `bytes`, so one ranged read fetches it); -1 for a plain file

In the tar layout `path` is the member's name inside the shard (the same name the files layout
would give the file), so `path` stays a unique, content-addressed key in both layouts; read an
image with `imgclf.storage.read_row(data_dir, ref)` (refs from `row_refs(frame)`), which handles both. DATA_DIR may
be a local folder or an object-store URL (`s3://bucket/prefix`, see imgclf.storage).

A large manifest (more than PART_ROWS rows) is written as parts: `DATA_DIR/manifest/_index.json`
names the Parquet parts of one write (`manifest/<write id>/part-00000.parquet`, ...) with their row
counts; the index, replaced atomically, is the commit point of a write, and when present it is
the manifest (`manifest.parquet` is then absent). `read_manifest` reads either as one frame;
`scan(data_dir, columns=..., split=..., status=...)` reads only the columns and rows asked for
(filters pushed down to each part's row groups), and `epoch_batches` walks one split in a seeded
shuffled order holding a few parts at a time, so a billion-row DATA_DIR is never in memory whole.

Rows with status "duplicate" still have a valid `path` (the shared file), so a
consumer may choose to use them; training uses only status "ok". Local files that get no
row (hidden, outside class folders, not regular files, unsafe archive members) are listed
under `skipped` in download_report.json. Manifests written before local sources, or before
`shard`/`offset` existed, read as before (missing columns take the defaults above).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf._files import atomic_path
from imgclf.errors import DataError
from imgclf.storage import RowRef
from imgclf.untrusted import check_labels

MANIFEST_NAME = "manifest.parquet"
PARTS_DIR = "manifest"  # a manifest written as parts: PARTS_DIR/_index.json names them
PARTS_INDEX = "_index.json"
PART_ROWS = 5_000_000  # a manifest of more rows is written as parts of this many rows
REPORT_NAME = "download_report.json"

# Every status a row can end with. Stable: other tooling reads these strings.
STATUSES: dict[str, str] = {
    "ok": "downloaded and validated",
    "invalid_url": "not an http(s) URL, or malformed",
    "missing_label": "the row has no label (its URL is not fetched for it)",
    "http_error": "the server answered with a non-retryable or exhausted error status",
    "timeout": "connect, read or total deadline exceeded (after retries)",
    "connection_error": "DNS failure, refused or reset connection (after retries)",
    "tls_error": "TLS failed: a certificate not trusted (self-signed, private CA, expired, other host; never "
                 "retried) or a failed handshake; trust a private CA with SSL_CERT_FILE=ca.pem",
    "too_many_redirects": "redirect loop or more redirects than allowed",
    "too_large": "body larger than --max-bytes, or more pixels than the bomb limit",
    "empty": "the body was empty",
    "not_image": "the body does not decode as a raster image (HTML, SVG, text, truncated)",
    "too_small": "the image is smaller than the minimum side",
    "unreadable": "a local file or archive member that cannot be read (missing, permission, not a regular file, "
                  "corrupt or encrypted member)",
    "duplicate": "same URL or same content as an earlier row (see duplicate_of)",
    "excluded": "set aside by `imgclf audit --apply` (error names the finding; see the audit's audit.csv)",
    "pending": "not attempted yet (only seen in an interrupted run's manifest)",
}

COLUMNS: dict[str, str] = {
    "row": "int64",
    "source": "string",
    "url": "string",
    "label": "string",
    "split": "string",
    "status": "string",
    "error": "string",
    "http_status": "int64",
    "attempts": "int64",
    "sha256": "string",
    "path": "string",
    "width": "int64",
    "height": "int64",
    "bytes": "int64",
    "duplicate_of": "int64",
    "shard": "string",
    "offset": "int64",
}
_DEFAULTS = {"duplicate_of": -1, "offset": -1}


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Order and type the columns as the contract says; missing columns get empty defaults."""
    out = pd.DataFrame(index=frame.index)
    for name, dtype in COLUMNS.items():
        if name in frame:
            col = frame[name]
        else:
            col = pd.Series(_DEFAULTS.get(name, "" if dtype == "string" else 0), index=frame.index)
        out[name] = col.fillna("" if dtype == "string" else 0).astype(dtype)
    return out


def write_manifest(frame: pd.DataFrame, data_dir: str | Path) -> Path:
    """Write atomically: a crash mid-write leaves the previous manifest intact."""
    path = Path(data_dir) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        normalize(frame).to_parquet(tmp, index=False)
    return path


_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def _holds_images(folder: Path, budget: int = 2000) -> bool:
    """A quick look (at most `budget` entries) for image files in sub-folders: an image folder."""
    for n, path in enumerate(folder.glob("*/**/*")):
        if n >= budget:
            return False
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            return True
    return False


def make_data_dir_hint(data_dir: Path) -> str:
    """The exact command that turns an image folder or archive into a data directory ("" if neither)."""
    import shlex

    from imgclf import sources

    try:
        kind = sources.source_kind(data_dir)
    except DataError:
        return ""
    if kind == "table" or (kind == "folder" and not _holds_images(data_dir)):
        return ""
    out = shlex.quote(str(data_dir.parent / f"{sources.source_stem(data_dir)}_data"))
    return (f"{data_dir}: images, not a data directory (no {MANIFEST_NAME}); make one with "
            f"`imgclf download {shlex.quote(str(data_dir))} --out {out}`, then use --data {out}")


def read_manifest(data_dir: str | Path) -> pd.DataFrame:
    """The manifest of a local DATA_DIR or of one on object storage (`s3://bucket/prefix`)."""
    from imgclf import storage

    if storage.is_url(data_dir):
        return _read_remote_manifest(str(data_dir))
    if (Path(data_dir) / PARTS_DIR / PARTS_INDEX).is_file():
        return scan(data_dir)
    path = Path(data_dir) / MANIFEST_NAME
    if not Path(data_dir).exists():  # a typo: say so, rather than "no manifest here; run download"
        raise DataError(f"{data_dir}: no such data directory (the folder does not exist)")
    if not path.is_file():
        hint = make_data_dir_hint(Path(data_dir))
        raise DataError(hint or f"{path}: no manifest here; run `imgclf download ... --out {data_dir}` first")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: unreadable manifest ({err.__class__.__name__})") from None
    return _checked(frame, path)


def is_parts(data_dir: str | Path) -> bool:
    """True for a local DATA_DIR whose manifest is written as parts (more than PART_ROWS rows):
    train, evaluate and audit then read it as a stream instead of as one frame of every row."""
    from imgclf import storage

    return not storage.is_url(data_dir) and (Path(data_dir) / PARTS_DIR / PARTS_INDEX).is_file()


def part_files(data_dir: str | Path) -> list[Path]:
    """The Parquet files of a local manifest: the parts its index names, or manifest.parquet."""
    index = Path(data_dir) / PARTS_DIR / PARTS_INDEX
    if not index.is_file():
        return [_local_file(Path(data_dir))]
    import json

    try:
        listed = json.loads(index.read_text(encoding="utf-8"))["parts"]
        files = [index.parent / str(part["path"]) for part in listed]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{index}: unreadable manifest index ({err.__class__.__name__})") from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{index}: names a part that is missing: {missing[0]}")
    return files


def _local_file(data_dir: Path) -> Path:
    """DATA_DIR/manifest.parquet, or the one-line error read_manifest gives for a wrong folder."""
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        read_manifest(data_dir)  # raises: no such folder, an image folder, no manifest
    return path


def dataset(data_dir: str | Path):  # noqa: ANN201 - pyarrow.dataset.Dataset, imported lazily
    """A lazy handle on a local manifest, one file or many parts (pyarrow.dataset): nothing read yet."""
    import pyarrow.dataset as ds

    files = part_files(data_dir)
    try:
        return ds.dataset([str(f) for f in files], format="parquet")
    except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{files[0].parent}: unreadable manifest ({err.__class__.__name__})") from None


def _filter(split: str | None, status: str | None):  # noqa: ANN202 - a pyarrow expression or None
    import pyarrow.dataset as ds

    expr = None
    for name, value in (("split", split), ("status", status)):
        if value is not None:
            term = ds.field(name) == value
            expr = term if expr is None else expr & term
    return expr


def scan(data_dir: str | Path, columns: list[str] | None = None, split: str | None = None,
         status: str | None = None) -> pd.DataFrame:
    """The manifest's rows of one split and/or status, only the columns asked for (all by default),
    typed as the contract says. Reads only those columns, part by part (filters pushed down)."""
    from imgclf import storage

    if storage.is_url(data_dir):  # one object: read it, then select
        frame = read_manifest(data_dir)
        keep = pd.Series(True, index=frame.index)
        for name, value in (("split", split), ("status", status)):
            if value is not None:
                keep &= frame[name] == value
        return frame.loc[keep, columns or list(frame.columns)].reset_index(drop=True)
    data = dataset(data_dir)
    present = [c for c in (columns or list(COLUMNS)) if c in data.schema.names]
    with _unreadable(data_dir, Exception):  # a corrupt part: pyarrow's own types
        # One part and a few batches read ahead: pyarrow's defaults hold 4 parts x 16 batches in flight.
        table = data.scanner(columns=present, filter=_filter(split, status), batch_readahead=2,
                             fragment_readahead=1).to_table()
    frame = table.to_pandas()
    if columns is None:
        return _checked(frame, Path(data_dir) / PARTS_DIR)
    for name in columns:  # typed as normalize() does, only the columns asked for
        dtype = COLUMNS.get(name, "string")
        default = _DEFAULTS.get(name, "" if dtype == "string" else 0)
        col = frame[name] if name in frame else pd.Series(default, index=frame.index)
        frame[name] = col.fillna("" if dtype == "string" else 0).astype(dtype)
    return frame[columns]


def count_rows(data_dir: str | Path, split: str | None = None, status: str | None = None) -> int:
    """Rows of one split and/or status of a local manifest (one file or parts), counted by pyarrow
    with the filter pushed down: no row is kept in memory."""
    with _unreadable(data_dir):
        return dataset(data_dir).count_rows(filter=_filter(split, status))


def scan_arrow(data_dir: str | Path, columns: list[str], split: str | None = None,
               status: str | None = None) -> Iterator[Any]:
    """`scan`, one row group (20,000 rows as download writes them) at a time, as a pyarrow Table of
    the columns asked for (as stored): a streaming pass for counting at any size. Read group by group
    on purpose: pyarrow's scanner decodes ahead of a slow consumer, a whole 5M-row part in memory."""
    data = dataset(data_dir)
    present = [c for c in columns if c in data.schema.names]
    expr = _filter(split, status)
    with _unreadable(data_dir):
        for fragment in data.get_fragments():
            for group in fragment.split_by_row_group(filter=expr):
                table = group.to_table(columns=present, filter=expr)
                if table.num_rows:
                    yield table


def rows_of(data_dir: str | Path, rows: set[int], columns: list[str]) -> pd.DataFrame:
    """The manifest rows numbered in `rows` (columns as stored), found by a filter pushed down to the
    parts: a few listed rows of a billion-row manifest without reading the others into memory."""
    import pyarrow.dataset as ds

    data = dataset(data_dir)
    with _unreadable(data_dir):
        table = data.to_table(columns=columns, filter=ds.field("row").isin(sorted(rows)))
    return table.to_pandas()


@contextlib.contextmanager
def _unreadable(data_dir: str | Path, errors: type[Exception] | tuple[type[Exception], ...] = (OSError, ValueError)
                ) -> Iterator[None]:
    """A corrupt part read by pyarrow is one line naming the data directory (ArrowInvalid is a ValueError,
    ArrowIOError an OSError)."""
    try:
        yield
    except errors as err:
        raise DataError(f"{data_dir}: unreadable manifest ({err.__class__.__name__}: {str(err)[:200]})") from None


def scan_batches(data_dir: str | Path, columns: list[str], split: str | None = None,
                 status: str | None = None) -> Iterator[pd.DataFrame]:
    """`scan_arrow` as pandas frames (for the few rows of one split, not for counting all of them)."""
    for batch in scan_arrow(data_dir, columns, split, status):
        yield batch.to_pandas()


def epoch_batches(data_dir: str | Path, split: str, seed: int, columns: list[str], batch_rows: int = 65_536,
                  groups_in_memory: int = 64) -> Iterator[pd.DataFrame]:
    """One epoch over the usable rows (status ok) of `split`, shuffled with `seed`: the row groups
    (20,000 rows each as download writes them) of every part in a shuffled order, `groups_in_memory`
    of them at a time shuffled together (the block shuffle of WebDataset and LitData), yielded
    `batch_rows` rows at a time. Memory holds those groups' selected columns, never the manifest."""
    import numpy as np
    import pyarrow as pa

    data = dataset(data_dir)
    groups = [g for frag in data.get_fragments() for g in frag.split_by_row_group()]
    rng = np.random.default_rng(seed)
    expr = _filter(split, "ok")
    order = rng.permutation(len(groups))
    for start in range(0, len(order), groups_in_memory):
        tables = [groups[i].to_table(columns=columns, filter=expr) for i in order[start:start + groups_in_memory]]
        block = pa.concat_tables(tables)
        block = block.take(rng.permutation(block.num_rows))
        for first in range(0, block.num_rows, batch_rows):
            yield block.slice(first, batch_rows).to_pandas()


def _read_remote_manifest(data_dir: str) -> pd.DataFrame:
    from imgclf import storage

    url = storage.join(data_dir, MANIFEST_NAME)
    try:
        data = storage.read_bytes(data_dir, MANIFEST_NAME)
    except FileNotFoundError:
        raise DataError(f"{url}: no manifest here; run `imgclf download ... --out {data_dir}` first") from None
    except OSError as err:
        raise DataError(f"{url}: cannot read the manifest ({str(err)[:200]})") from None
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{url}: unreadable manifest ({err.__class__.__name__})") from None
    return _checked(frame, url)


def _checked(frame: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    missing = [c for c in ("url", "label", "split", "status", "path") if c not in frame]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    frame = normalize(frame)
    check_labels(frame["label"], lambda i: f"{path}: row {frame['row'].iloc[i]}")
    return frame


def row_refs(frame: pd.DataFrame) -> list[RowRef]:
    """Where each row's image is (for imgclf.storage.read_row); frames without shard columns are files."""
    n = len(frame)
    shards = frame["shard"].tolist() if "shard" in frame else [""] * n
    offsets = frame["offset"].tolist() if "offset" in frame else [-1] * n
    sizes = frame["bytes"].tolist() if "bytes" in frame else [0] * n
    return [RowRef(str(p), "" if pd.isna(s) else str(s), -1 if pd.isna(o) else int(o), 0 if pd.isna(b) else int(b))
            for p, s, o, b in zip(frame["path"].tolist(), shards, offsets, sizes, strict=True)]


def usable_rows(frame: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    """Rows with a validated image on disk, optionally of one split."""
    rows = frame[frame["status"] == "ok"]
    if split is not None:
        rows = rows[rows["split"] == split]
    return rows.reset_index(drop=True)

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

Rows with status "duplicate" still have a valid `path` (the shared file), so a
consumer may choose to use them; training uses only status "ok". Local files that get no
row (hidden, outside class folders, not regular files, unsafe archive members) are listed
under `skipped` in download_report.json. Manifests written before local sources, or before
`shard`/`offset` existed, read as before (missing columns take the defaults above).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from imgclf._files import atomic_path
from imgclf.errors import DataError
from imgclf.storage import RowRef
from imgclf.untrusted import check_labels

MANIFEST_NAME = "manifest.parquet"
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

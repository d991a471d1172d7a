"""What a download source is, and reading the user's tables (CSV, TSV, Parquet) in bounded chunks.

A source is one of (see `source_kind`):
  - a table (.csv, .tsv, .tab, .txt, .parquet) with a `label` column and a `url` and/or `path`
    column (a path is relative to the table's folder), and optionally `split`; `Columns` maps
    other column names (`--url-col`, `--label-col`, `--split-col`, `--path-col`);
  - a folder in ImageFolder layout (read by imgclf.download._local);
  - an archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .tar.zst) of such a folder
    (read by imgclf.download._archive, never unpacked).
Without a `split` column the source's name names the split when it is one of train/val/test
(and the aliases in SPLIT_ALIASES); otherwise rows are "train".
Rows are numbered over all tables in order: that number is the manifest's `row`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgclf.errors import DataError
from imgclf.untrusted import check_labels, check_table_header

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".parquet")
# Archive suffix -> format; the longest matching suffix wins (".tar.gz" before ".gz").
ARCHIVE_SUFFIXES = {
    ".zip": "zip", ".tar": "tar",
    ".tar.gz": "tar.gz", ".tgz": "tar.gz",
    ".tar.bz2": "tar.bz2", ".tbz2": "tar.bz2", ".tbz": "tar.bz2",
    ".tar.xz": "tar.xz", ".txz": "tar.xz",
    ".tar.zst": "tar.zst", ".tzst": "tar.zst", ".tar.zstd": "tar.zst",
}
SourceKind = Literal["table", "folder", "archive"]


@dataclass(frozen=True)
class Columns:
    """Which table columns hold what. None: the default name (url, label, split, path).

    A column named here must exist; so must `label`, and `url` or `path`.
    """

    url: str | None = None
    label: str | None = None
    split: str | None = None
    path: str | None = None


def archive_format(path: Path) -> str | None:
    """"zip", "tar", "tar.gz", ... from the file name (any case), or None when not an archive."""
    name = path.name.lower()
    matches = [s for s in ARCHIVE_SUFFIXES if name.endswith(s) and len(name) > len(s)]
    return ARCHIVE_SUFFIXES[max(matches, key=len)] if matches else None


def source_kind(path: Path) -> SourceKind:
    """What kind of source `path` is; a one-line DataError when it is none (or missing)."""
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise DataError(f"{path}: source not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file or folder (a FIFO or device cannot be a source)")
    if archive_format(path):
        return "archive"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    raise DataError(f"{path}: unsupported source type (use a folder, .csv/.tsv/.parquet, or an archive: "
                    f"{', '.join(sorted(ARCHIVE_SUFFIXES))})")


def source_stem(path: Path) -> str:
    """The name without its table or archive suffix: `test.tar.gz` -> `test`."""
    name = path.name
    fmt_suffix = max((s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)), key=len, default="")
    if fmt_suffix and len(name) > len(fmt_suffix):
        return name[: -len(fmt_suffix)]
    return path.stem if path.suffix.lower() in TABLE_SUFFIXES else name


def split_from_stem(path: Path) -> str:
    return SPLIT_ALIASES.get(source_stem(path).lower(), "train")


def _norm(name: str) -> str:
    return name.strip().lower()


def _resolve_columns(path: Path, found: list[str], columns: Columns) -> dict[str, str]:
    """Map our names (url, label, split, path) to the table's normalised column names."""
    present = set(found)
    listed = ", ".join(found) or "none"
    wanted: dict[str, str] = {}
    for ours, flag in (("url", "--url-col"), ("label", "--label-col"), ("split", "--split-col"),
                       ("path", "--path-col")):
        given = getattr(columns, ours)
        name = _norm(given) if given else ours
        if name in present:
            wanted[ours] = name
        elif given:
            raise DataError(f"{path}: no column {given!r} ({flag}); columns: {listed}")
    missing = [c for c in ("label",) if c not in wanted]
    if "url" not in wanted and "path" not in wanted:
        missing.insert(0, "url (or path)")
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {listed})")
    return wanted


def _used_names(columns: Columns) -> set[str]:
    given = (columns.url, columns.label, columns.split, columns.path)
    return {"url", "label", "split", "path"} | {_norm(c) for c in given if c}


def _refuse_duplicates(path: Path, names: list[str], columns: Columns) -> None:
    used = _used_names(columns)
    twice = sorted({n for n in names if n in used and names.count(n) > 1})
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears more than once; rename one")


def _raw_chunks(path: Path, chunk_rows: int, columns: Columns) -> Iterator[pd.DataFrame]:
    """Chunks with our column names (url, label, and split/path when the table has them)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pfile = pq.ParquetFile(path)
        # Same normalisation as CSV headers, so `URL,Label` works in both; read by original name.
        by_name = {_norm(c): c for c in reversed(pfile.schema_arrow.names)}
        _refuse_duplicates(path, [_norm(c) for c in pfile.schema_arrow.names], columns)
        wanted = _resolve_columns(path, list(by_name), columns)
        rename = {by_name[theirs]: ours for ours, theirs in wanted.items()}
        for batch in pfile.iter_batches(batch_size=chunk_rows, columns=list(rename)):
            yield batch.to_pandas().rename(columns=rename)
        return
    sep = "\t" if suffix in (".tsv", ".tab") else ","
    # A column named twice, or a first row longer than the header (pandas would shift it: the URL
    # becomes an index), is refused naming the line; index_col=False makes longer rows errors too.
    check_table_header(path, sep, _used_names(columns))
    reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, chunksize=chunk_rows, index_col=False)
    wanted: dict[str, str] | None = None
    for chunk in reader:
        chunk.columns = [_norm(c) for c in chunk.columns]
        if wanted is None:
            wanted = _resolve_columns(path, list(chunk.columns), columns)
        yield pd.DataFrame({ours: chunk[theirs] for ours, theirs in wanted.items()})


def _text(chunk: pd.DataFrame, name: str) -> object:
    if name not in chunk:
        return ""
    return chunk[name].fillna("").astype(str).str.strip().to_numpy()


def iter_sources(paths: list[str | Path], chunk_rows: int = 50_000,
                 columns: Columns | None = None) -> Iterator[pd.DataFrame]:
    """Yield frames with columns row, source, url, label, split, path ("" when the table has none).

    Memory stays O(chunk_rows). Only tables: folders and archives are read by imgclf.download.
    """
    columns = columns or Columns()
    row = 0
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise DataError(f"{path}: source file not found")
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: unsupported source type (use .csv, .tsv or .parquet)")
        default_split = split_from_stem(path)
        first = row
        try:
            for chunk in _raw_chunks(path, chunk_rows, columns):
                n = len(chunk)
                out = pd.DataFrame({
                    "row": range(row, row + n),
                    "source": str(path),
                    "url": _text(chunk, "url"),
                    "label": _text(chunk, "label"),
                })
                if "split" in chunk:
                    splits = chunk["split"].fillna("").astype(str).str.strip().str.lower()
                    out["split"] = [SPLIT_ALIASES.get(s, s) or default_split for s in splits]
                else:
                    out["split"] = default_split
                out["path"] = _text(chunk, "path")
                # Labels are data: one with a control character is refused, never cut (imgclf.untrusted).
                # Checked before stripping: str.strip() would silently drop a trailing \x1f or \x85.
                raw = chunk["label"].fillna("").astype(str) if "label" in chunk else out["label"]
                check_labels(raw, lambda i, at=row - first, p=path: f"{p}: data row {at + i + 1}")
                row += n
                yield out
        except DataError:
            raise
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty file, no header row") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, pa.ArrowException) as err:
            first_line = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"{path}: cannot parse ({first_line})") from None


def read_sources(paths: list[str | Path]) -> pd.DataFrame:
    """All rows at once; fine for small inputs (the downloader itself streams)."""
    chunks = list(iter_sources(paths))
    if not chunks:
        return pd.DataFrame(columns=["row", "source", "url", "label", "split", "path"])
    return pd.concat(chunks, ignore_index=True)

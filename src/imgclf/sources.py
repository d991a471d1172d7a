"""What a download source is, and reading the user's tables (CSV, TSV, Parquet) in bounded chunks.

A source is one of (see `source_kind`):
  - a table (.csv, .tsv, .tab, .txt, .parquet, or JSON Lines .jsonl/.ndjson) with a `label` column
    (or `labels`, which may hold lists) and a `url` and/or `path` column (a path is relative to the
    table's folder), and optionally `split`; `Columns` maps
    other column names (`--url-col`, `--label-col`, `--split-col`, `--path-col`);
  - a folder in ImageFolder layout (read by imgclf.download._local);
  - an archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .tar.zst) of such a folder
    (read by imgclf.download._archive, never unpacked).
Without a `split` column the source's name names the split when it is one of train/val/test
(and the aliases in SPLIT_ALIASES); otherwise rows are "train".
Rows are numbered over all tables in order: that number is the manifest's `row`.

Metadata has a byte budget (a 159 KB Parquet can hold a gigabyte of URL text): each table chunk
holds at most about `CHUNK_BYTES` of cell text (rows per chunk are derived from the file: Parquet
metadata, or a CSV's longest line), a URL cell over `MAX_URL_BYTES` or a path cell over
`MAX_PATH_BYTES` is replaced by a short marker before it is stored (its row ends `invalid_url` /
`unreadable`, see `cut_problem`), a label over `MAX_LABEL_BYTES` or a split over `MAX_SPLIT_BYTES`
is refused with one line, and one input file may hold at most `metadata_budget(file)` bytes of
url/label/split/path text in all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgclf.errors import DataError
from imgclf.untrusted import check_labels, check_table_header, shown

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".parquet", ".jsonl", ".ndjson")
JSON_LINES = (".jsonl", ".ndjson")  # one JSON object per line; a `labels` value may be a list
# Archive suffix -> format; the longest matching suffix wins (".tar.gz" before ".gz").
ARCHIVE_SUFFIXES = {
    ".zip": "zip", ".tar": "tar",
    ".tar.gz": "tar.gz", ".tgz": "tar.gz",
    ".tar.bz2": "tar.bz2", ".tbz2": "tar.bz2", ".tbz": "tar.bz2",
    ".tar.xz": "tar.xz", ".txz": "tar.xz",
    ".tar.zst": "tar.zst", ".tzst": "tar.zst", ".tar.zstd": "tar.zst",
}
SourceKind = Literal["table", "folder", "archive"]

# Byte budget of input metadata (see the module docstring). 8 KB for a URL, as browsers and
# servers accept; a path longer than PATH_MAX cannot name a file anyway.
MAX_URL_BYTES = 8192
MAX_PATH_BYTES = 4096
MAX_LABEL_BYTES = 1024
MAX_SPLIT_BYTES = 64
CHUNK_BYTES = 8 << 20
METADATA_FLOOR = 64 << 20
METADATA_RATIO = 20
_CUT = "\u2026[cut: "  # the stored form of an over-long cell: its start, its size and a hash


def metadata_budget(path: Path) -> int:
    """Bytes of metadata text one input file may yield: a floor, or 20x its size on disk (a
    compressed Parquet or archive that expands more than that is a bomb, not a dataset)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return max(METADATA_FLOOR, METADATA_RATIO * size)


def cut_cell(value: str) -> str:
    """The stored stand-in of an over-long cell: short, and distinct per value (a hash)."""
    raw = value.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{value[:80]}{_CUT}{len(raw)} bytes, sha256 {digest}]"


def cut_problem(cell: str, what: str, limit: int) -> str:
    """The row's error when `cell` is a `cut_cell` stand-in, else ""."""
    at = cell.rfind(_CUT)
    if at < 0 or not cell.endswith("]"):
        return ""
    size = cell[at + len(_CUT):].split(" ", 1)[0]
    return f"{what} of {size} bytes, over the {limit}-byte limit (not stored)"


def _utf8_len(values: pd.Series, limit: int) -> np.ndarray:
    """UTF-8 size of each cell, counted exactly only where its characters could pass `limit`."""
    lengths = np.array(values.str.len().to_numpy(dtype=np.int64, na_value=0))  # a writable copy
    wide = np.flatnonzero(lengths > limit // 4)
    for i in wide:
        lengths[i] = len(values.iat[i].encode("utf-8", "surrogatepass"))
    return lengths


def _cap_column(values: pd.Series, limit: int) -> tuple[pd.Series, int]:
    """Over-long cells replaced by `cut_cell`; and the bytes the column stores."""
    lengths = _utf8_len(values, limit)
    over = np.flatnonzero(lengths > limit)
    if len(over):
        # A list, not values.iat[i] = ...: an Arrow-backed column copies itself on every set.
        cells = values.tolist()
        for i in over:
            cells[i] = cut_cell(cells[i])
            lengths[i] = len(cells[i])
        values = pd.Series(cells, index=values.index, dtype=object)
    return values, int(lengths.sum())


def _refuse_long(values: pd.Series, limit: int, what: str, where: Callable[[int], str]) -> int:
    """A one-line DataError for the first cell over `limit` bytes; else the bytes of the column."""
    lengths = _utf8_len(values, limit)
    over = np.flatnonzero(lengths > limit)
    if len(over):
        i = int(over[0])
        raise DataError(f"{where(i)}: {what} of {int(lengths[i])} bytes (limit {limit}); {what}s are data, "
                        "refused rather than cut")
    return int(lengths.sum())


@dataclass(frozen=True)
class Columns:
    """Which table columns hold what. None: the default name (url, label, split, path).

    A column named here must exist; so must `label`, and `url` or `path`.
    """

    url: str | None = None
    label: str | None = None
    split: str | None = None
    path: str | None = None
    # `download --label-sep`: label cells hold sets joined by this (multi-label data). A list column
    # (Parquet) is stored joined with it, and an empty cell is an image with no label (fetched and
    # kept), not a row with status missing_label. None: one label per cell; a list is joined with "|".
    label_sep: str | None = None


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
        if ours == "label" and not given and name not in present and "labels" in present:
            name = "labels"  # a multi-label table's list (or joined) column
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
        rows = _parquet_rows(path, pfile, list(rename), chunk_rows)
        for batch in pfile.iter_batches(batch_size=rows, columns=list(rename)):
            yield batch.to_pandas().rename(columns=rename)
        return
    if suffix in JSON_LINES:
        yield from _json_lines_chunks(path, chunk_rows, columns)
        return
    sep = "\t" if suffix in (".tsv", ".tab") else ","
    # A column named twice, or a first row longer than the header (pandas would shift it: the URL
    # becomes an index), is refused naming the line; index_col=False makes longer rows errors too.
    check_table_header(path, sep, _used_names(columns))
    reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False,
                         chunksize=_text_rows(path, chunk_rows))
    wanted: dict[str, str] | None = None
    for chunk in reader:
        chunk.columns = [_norm(c) for c in chunk.columns]
        if wanted is None:
            wanted = _resolve_columns(path, list(chunk.columns), columns)
        yield pd.DataFrame({ours: chunk[theirs] for ours, theirs in wanted.items()})


def _json_lines_chunks(path: Path, chunk_rows: int, columns: Columns) -> Iterator[pd.DataFrame]:
    """JSON Lines in chunks (rows per chunk from the longest line, as CSV); text cells as strings,
    missing keys and nulls as "", a list in the label column kept for `_joined_lists`."""
    try:
        reader = pd.read_json(path, lines=True, chunksize=_text_rows(path, chunk_rows), dtype=False)
        wanted: dict[str, str] | None = None
        for chunk in reader:
            chunk.columns = [_norm(str(c)) for c in chunk.columns]
            if wanted is None:
                _refuse_duplicates(path, list(chunk.columns), columns)
                wanted = _resolve_columns(path, list(chunk.columns), columns)
            yield pd.DataFrame({ours: chunk[theirs].map(_json_cell) if ours != "label" else chunk[theirs]
                                for ours, theirs in wanted.items()})
    except ValueError as err:  # pandas' JSON parser: malformed line, not an object per line
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: cannot parse as JSON Lines ({first[:200]})") from None


def _json_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _joined_lists(labels: pd.Series, sep: str, where: Callable[[int], str]) -> pd.Series:
    """A list column of labels (Parquet list<string>) as text cells joined with `sep`; other columns as
    they are. A label holding the separator itself would split into other labels later: refused."""
    cells = labels.tolist()
    if not any(isinstance(cell, list | tuple | np.ndarray) for cell in cells):
        return labels
    out = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, list | tuple | np.ndarray):
            out.append(_json_cell(cell))
            continue
        parts = [str(part).strip() for part in cell if part is not None and str(part).strip()]
        bad = next((part for part in parts if sep in part), None)
        if bad is not None:
            raise DataError(f"{where(i)}: label {shown(bad, 60)} contains the label separator "
                            f"{sep!r}; choose another with --label-sep")
        out.append(sep.join(parts))
    return pd.Series(out, index=labels.index, dtype=object)


def _parquet_rows(path: Path, pfile: pq.ParquetFile, names: list[str], chunk_rows: int) -> int:
    """Rows per batch so a batch holds about CHUNK_BYTES of our columns (from the file's metadata,
    before anything is decompressed); a file whose columns exceed its budget is refused now."""
    meta = pfile.metadata
    wanted = set(names)
    total, densest = 0, 0.0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                   if group.column(c).path_in_schema in wanted)
        total += size
        densest = max(densest, size / max(1, group.num_rows))
    budget = metadata_budget(path)
    if total > budget:
        names = ", ".join(shown(c, 40) for c in sorted(wanted))
        raise DataError(f"{path}: its {names} column(s) hold {total} bytes uncompressed, "
                        f"over the {budget}-byte metadata budget of one input file ({METADATA_RATIO}x its size, "
                        f"at least {METADATA_FLOOR}); split it, or check where it came from")
    return max(1, min(chunk_rows, int(CHUNK_BYTES / max(densest, 1.0))))


def _text_rows(path: Path, chunk_rows: int, block: int = 8 << 20) -> int:
    """Rows per chunk so a chunk of a CSV/TSV holds about CHUNK_BYTES: from its longest line (one
    pass over the bytes, vectorised)."""
    longest, carry = 1, 0
    with open(path, "rb") as fh:
        while data := fh.read(block):
            raw = np.frombuffer(data, dtype=np.uint8)
            ends = np.flatnonzero((raw == 10) | (raw == 13))  # \n, and \r alone (old Mac files)
            if len(ends) == 0:
                carry += len(data)
                longest = max(longest, carry)
                continue
            longest = max(longest, carry + int(ends[0]) + 1)
            if len(ends) > 1:
                longest = max(longest, int(np.diff(ends).max()))
            carry = len(data) - int(ends[-1]) - 1
    longest = max(longest, carry)
    return max(1, min(chunk_rows, CHUNK_BYTES // longest))


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
        first, used, budget = row, 0, metadata_budget(path)
        try:
            for chunk in _raw_chunks(path, chunk_rows, columns):
                n = len(chunk)
                where = lambda i, at=row - first, p=path: f"{p}: data row {at + i + 1}"  # noqa: E731
                if "label" in chunk:  # a list column (multi-label) becomes joined text
                    chunk = chunk.assign(label=_joined_lists(chunk["label"], columns.label_sep or "|", where))
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
                check_labels(raw, where)
                used += _budget_chunk(out, where)
                if used > budget:
                    raise DataError(f"{path}: more than {budget} bytes of url/label/split/path text, the "
                                    f"metadata budget of one input file ({METADATA_RATIO}x its size, at least "
                                    f"{METADATA_FLOOR}); split it, or check where it came from")
                row += n
                yield out
        except DataError:
            raise
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty file, no header row") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, pa.ArrowException) as err:
            first_line = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"{path}: cannot parse ({first_line})") from None


def _budget_chunk(out: pd.DataFrame, where: Callable[[int], str]) -> int:
    """Cap the chunk's cells in place (URL and path cut, label and split refused when too long);
    return the bytes of text it stores."""
    used = _refuse_long(out["label"], MAX_LABEL_BYTES, "label", where)
    used += _refuse_long(out["split"], MAX_SPLIT_BYTES, "split", where)
    for name, limit in (("url", MAX_URL_BYTES), ("path", MAX_PATH_BYTES)):
        out[name], size = _cap_column(out[name], limit)
        used += size
    return used


def read_sources(paths: list[str | Path]) -> pd.DataFrame:
    """All rows at once; fine for small inputs (the downloader itself streams)."""
    chunks = list(iter_sources(paths))
    if not chunks:
        return pd.DataFrame(columns=["row", "source", "url", "label", "split", "path"])
    return pd.concat(chunks, ignore_index=True)

"""Read the user's URL lists (CSV, TSV, Parquet) in bounded chunks.

A source has columns `url` and `label`, and optionally `split`. Without a `split`
column the file stem names the split when it is one of train/val/test (and
valid/validation/dev as aliases of val); otherwise rows are "train".
Rows are numbered over all sources in order: that number is the manifest's `row`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgclf.errors import DataError

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
REQUIRED = ("url", "label")


def split_from_stem(path: Path) -> str:
    return SPLIT_ALIASES.get(path.stem.lower(), "train")


def _check_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        found = ", ".join(columns) or "none"
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {found})")


def _raw_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pfile = pq.ParquetFile(path)
        # Same normalisation as CSV headers, so `URL,Label` works in both; read by original name.
        by_name = {c.strip().lower(): c for c in reversed(pfile.schema_arrow.names)}
        _check_columns(path, list(by_name))
        wanted = {by_name[c]: c for c in ("url", "label", "split") if c in by_name}
        for batch in pfile.iter_batches(batch_size=chunk_rows, columns=list(wanted)):
            yield batch.to_pandas().rename(columns=wanted)
        return
    sep = "\t" if suffix in (".tsv", ".tab") else ","
    reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, chunksize=chunk_rows)
    first = True
    for chunk in reader:
        chunk.columns = [c.strip().lower() for c in chunk.columns]
        if first:
            _check_columns(path, list(chunk.columns))
            first = False
        yield chunk


def iter_sources(paths: list[str | Path], chunk_rows: int = 50_000) -> Iterator[pd.DataFrame]:
    """Yield frames with columns row, source, url, label, split; memory stays O(chunk_rows)."""
    row = 0
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise DataError(f"{path}: source file not found")
        if path.suffix.lower() not in (".csv", ".tsv", ".tab", ".txt", ".parquet"):
            raise DataError(f"{path}: unsupported source type (use .csv, .tsv or .parquet)")
        default_split = split_from_stem(path)
        try:
            for chunk in _raw_chunks(path, chunk_rows):
                n = len(chunk)
                out = pd.DataFrame({
                    "row": range(row, row + n),
                    "source": str(path),
                    "url": chunk["url"].fillna("").astype(str).str.strip().to_numpy(),
                    "label": chunk["label"].fillna("").astype(str).str.strip().to_numpy(),
                })
                if "split" in chunk:
                    splits = chunk["split"].fillna("").astype(str).str.strip().str.lower()
                    out["split"] = [SPLIT_ALIASES.get(s, s) or default_split for s in splits]
                else:
                    out["split"] = default_split
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
        return pd.DataFrame(columns=["row", "source", "url", "label", "split"])
    return pd.concat(chunks, ignore_index=True)

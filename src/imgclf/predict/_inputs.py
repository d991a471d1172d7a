"""Expand what a user types after `imgclf predict` into a flat list of inputs.

An argument is, in this order: an http(s) URL; a CSV/TSV file with a `url` or `path` column
(relative paths are relative to the CSV's folder); a folder (searched recursively for image
files); an existing file; otherwise a glob pattern (`**` allowed). An argument that names
nothing becomes an input with an error, so the rest of the batch still runs.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from imgclf.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".tab"})


@dataclass(frozen=True)
class Input:
    source: str  # what the output row shows: the URL or the path
    kind: str  # "url", "file" or "missing"
    error: str = ""  # only for kind "missing"


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _from_table(path: Path) -> Iterator[Input]:
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse ({str(err).splitlines()[0]})") from None
    frame.columns = [c.strip().lower() for c in frame.columns]
    column = next((c for c in ("url", "path") if c in frame.columns), None)
    if column is None:
        found = ", ".join(frame.columns) or "none"
        raise DataError(f"{path}: needs a 'url' or 'path' column (found: {found})")
    for value in frame[column].str.strip():
        if not value:
            yield Input("", "missing", f"{path}: empty {column}")
        elif is_url(value):
            yield Input(value, "url")
        else:
            local = Path(value) if Path(value).is_absolute() else path.parent / value
            yield Input(str(local), "file")


def _from_folder(folder: Path) -> Iterator[Input]:
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
            yield Input(str(file), "file")


def expand_inputs(arguments: list[str]) -> list[Input]:
    """Every input in the order given; folders and globs sorted so output order is stable."""
    out: list[Input] = []
    for arg in arguments:
        path = Path(arg)
        if is_url(arg):
            out.append(Input(arg, "url"))
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            out.extend(_from_table(path))
        elif path.is_dir():
            found = list(_from_folder(path))
            out.extend(found or [Input(arg, "missing", f"{arg}: folder holds no image files")])
        elif path.is_file():
            out.append(Input(arg, "file"))
        else:
            matches = sorted(m for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if matches:
                out.extend(Input(m, "file") for m in matches)
            else:
                out.append(Input(arg, "missing", f"{arg}: no such file, folder or matching glob"))
    return out

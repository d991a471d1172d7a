"""Expand what a user types after `imgclf predict` into a flat list of inputs.

An argument is, in this order: an http(s) URL; a CSV/TSV file with a `url` or `path` column
(relative paths are relative to the CSV's folder); a folder (searched recursively for image
files); an existing file of any other kind; otherwise a glob pattern (`**` allowed). An argument
that names nothing becomes an input with an error, so the rest of the batch still runs.

Listing is bounded and never loops: folder walks and `**` follow symlinks to folders, but enter
each real folder (device, inode) once, so `x -> .` and `y -> .` end. Nothing is read here; files
are read later by `images.read_file` (regular files only, up to a size cap), so a FIFO, a socket,
/dev/zero or a folder named in a CSV becomes an error row, never a hang or an unbounded read.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from imgclf.errors import DataError
from imgclf.untrusted import check_table_header

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".tab"})
_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class Input:
    source: str  # what the output row shows: the URL or the path
    kind: str  # "url", "file" or "missing"
    error: str = ""  # only for kind "missing"


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _from_table(path: Path) -> Iterator[Input]:
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    check_table_header(path, sep, used=("url", "path"))
    try:
        # index_col=False: a row longer than the header is an error, never a shifted index column.
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse ({str(err).strip().splitlines()[0][:200]})") from None
    frame.columns = [c.strip().lower() for c in frame.columns]
    column = next((c for c in ("url", "path") if c in frame.columns), None)
    if column is None:
        found = ", ".join(frame.columns)[:200] or "none"
        raise DataError(f"{path}: needs a 'url' or 'path' column (found: {found})")
    for line, value in enumerate(frame[column].str.strip(), start=2):
        if not value:
            yield Input("", "missing", f"{path}: line {line}: empty {column}")
        elif is_url(value):
            yield Input(value, "url")
        else:
            local = Path(value) if Path(value).is_absolute() else path.parent / value
            yield Input(str(local), "file")


def _real_key(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)  # follows symlinks: a link and its target are one folder
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _entries(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []  # unreadable folder: nothing to list (a missing input is reported by the caller)


def walk_folders(root: str, hidden: bool = True) -> Iterator[str]:
    """`root` and every folder below it, following symlinks, each real folder once (no loops)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        key = _real_key(folder)
        if key is None or key in seen:
            continue
        seen.add(key)
        yield folder
        for entry in _entries(folder):
            if (hidden or not entry.name.startswith(".")) and _is_dir(entry):
                stack.append(entry.path)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _from_folder(folder: Path) -> Iterator[Input]:
    found = [entry.path for sub in walk_folders(str(folder)) for entry in _entries(sub)
             if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and not _is_dir(entry)]
    for file in sorted(found):
        yield Input(file, "file")


def _match(folder: str, parts: tuple[str, ...], out: set[str]) -> None:
    """Add to `out` what matches `parts` below `folder` (`**`: any number of folders)."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        for sub in walk_folders(folder, hidden=False):
            if rest:
                _match(sub, rest, out)
            else:
                out.update(e.path for e in _entries(sub) if not e.name.startswith("."))
        return
    for entry in _entries(folder):
        if entry.name.startswith(".") and not head.startswith("."):
            continue  # like glob: `*` does not match hidden names
        if fnmatch.fnmatchcase(entry.name, head):
            if not rest:
                out.add(entry.path)
            elif _is_dir(entry):
                _match(entry.path, rest, out)


def expand_glob(pattern: str) -> list[str]:
    """Non-folder paths matching `pattern` (`**` allowed), sorted; symlink loops end (see module doc)."""
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if _MAGIC & set(part)), len(parts))
    if first == len(parts):
        return []
    base = str(Path(*parts[:first])) if first else "."
    found: set[str] = set()
    _match(base, parts[first:], found)
    prefix = "./" if not first else ""
    return sorted(p[len(prefix):] if prefix and p.startswith(prefix) else p for p in found
                  if not os.path.isdir(p))


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
        elif os.path.lexists(arg):  # a file, or a FIFO, device or broken link: reading says which
            out.append(Input(arg, "file"))
        else:
            matches = expand_glob(arg)
            if matches:
                out.extend(Input(m, "file") for m in matches)
            else:
                out.append(Input(arg, "missing", f"{arg}: no such file, folder or matching glob"))
    return out

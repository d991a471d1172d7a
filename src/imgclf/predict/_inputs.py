"""Expand what a user types after `imgclf predict` into a flat stream of inputs.

An argument is, in this order: an http(s) URL; a CSV/TSV file with a `url` and/or `path` column
(the columns `download` reads, renamed by `--url-col`/`--path-col` as there; a row uses its url,
else its path; relative paths are relative to the CSV's folder; the row's other columns travel
with it into the output); a folder (searched recursively for image
files); an existing file of any other kind; otherwise a glob pattern (`**` allowed). An argument
that names nothing becomes an input with an error, so the rest of the batch still runs.

Listing is bounded and never loops: folder walks and `**` follow symlinks to folders, but enter
each real folder (device, inode) once, so `x -> .` and `y -> .` end. Nothing is read here; files
are read later by `images.read_file` (regular files only, up to a size cap), so a FIFO, a socket,
/dev/zero or a folder named in a CSV becomes an error row, never a hang or an unbounded read.

The stream is lazy: a table is read row by row (the csv module, never a whole frame) and a folder
is listed when predict reaches it, so a list of ten million URLs costs no more memory than one
batch. What can be refused up front is refused before the first prediction: a table's header
(no url/path column, a duplicate column, a first row longer than the header).
"""

from __future__ import annotations

import csv
import fnmatch
import itertools
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import DataError
from imgclf.prediction import failure
from imgclf.untrusted import check_table_header

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".tab"})
_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class Input:
    source: str  # what the output row shows: the URL or the path
    kind: str  # "url", "file" or "missing"
    error: str = ""  # only for kind "missing": a failure value, "unreadable: <message>"
    columns: tuple[tuple[str, str], ...] = ()  # a table row's other cells (name, value), passed through


@dataclass(frozen=True)
class TableColumns:
    """Which table columns hold the inputs (`--url-col`, `--path-col`; None: url, path)."""

    url: str | None = None
    path: str | None = None

    def wanted(self) -> tuple[str, str]:
        return (self.url or "url").strip().lower(), (self.path or "path").strip().lower()


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _table_columns(path: Path, sep: str, columns: TableColumns) -> list[str]:
    """The columns a table's inputs are in (url first); refused now (one line) rather than mid-run."""
    wanted = columns.wanted()
    names = check_table_header(path, sep, used=wanted)
    for flag, given, name in (("--url-col", columns.url, wanted[0]), ("--path-col", columns.path, wanted[1])):
        if given is not None and name not in names:
            raise DataError(f"{path}: no column {given!r} ({flag}; found: {', '.join(names)[:200] or 'none'})")
    found = [c for c in wanted if c in names]
    if not found:
        raise DataError(f"{path}: needs a {wanted[0]!r} or {wanted[1]!r} column (found: "
                        f"{', '.join(names)[:200] or 'none'})")
    return found


def passed_through(arguments: list[str], columns: TableColumns) -> list[str]:
    """The other columns of the table arguments, in order of appearance: what the output adds per row."""
    out: list[str] = []
    for arg in arguments:
        path = Path(arg)
        if not is_url(arg) and path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
            names = check_table_header(path, sep, used=columns.wanted())
            out += [n for n in names if n and n not in columns.wanted() and n not in out]
    return out


def _table_rows(path: Path, sep: str, used: list[str]) -> Iterator[Input]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=sep)
            header = [c.strip().lower() for c in next(reader, [])]
            index = [header.index(c) for c in used]
            for row in reader:
                if not row:
                    continue  # a blank line is no input (as pandas skipped it)
                if len(row) > len(header):  # an unquoted separator: the columns may be shifted
                    raise DataError(f"{path}: line {reader.line_num}: {len(row)} fields but the header has "
                                    f"{len(header)}; quote values that hold '{sep}'")
                cells = [row[i].strip() if i < len(row) else "" for i in index]
                value = next((c for c in cells if c), "")
                others = tuple((name, cell) for name, cell in zip(header, row, strict=False)
                               if name and name not in used)
                yield _table_input(path, value, " or ".join(used), reader.line_num, others)
    except (csv.Error, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot parse ({str(err).strip()[:200]})") from None


def _table_input(path: Path, value: str, column: str, line: int, others: tuple[tuple[str, str], ...]) -> Input:
    if not value:
        return Input("", "missing", failure("unreadable", f"{path}: line {line}: empty {column}"), others)
    if is_url(value):
        return Input(value, "url", columns=others)
    local = Path(value) if Path(value).is_absolute() else path.parent / value
    return Input(str(local), "file", columns=others)


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


def _from_argument(arg: str, columns: TableColumns) -> Iterable[Input]:
    """The inputs one argument names, lazily; a table's header is checked now."""
    path = Path(arg)
    if is_url(arg):
        return [Input(arg, "url")]
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return _table_rows(path, sep, _table_columns(path, sep, columns))
    if path.is_dir():
        return _or_missing(_from_folder(path), arg, "folder holds no image files")
    if os.path.lexists(arg):  # a file, or a FIFO, device or broken link: reading says which
        return [Input(arg, "file")]
    return _or_missing((Input(m, "file") for m in expand_glob(arg)), arg, "no such file, folder or matching glob")


def _or_missing(found: Iterator[Input], arg: str, reason: str) -> Iterator[Input]:
    first = next(found, None)
    if first is None:
        yield Input(arg, "missing", failure("unreadable", reason))  # the input column names arg
        return
    yield first
    yield from found


def expand_inputs(arguments: list[str], columns: TableColumns = TableColumns()) -> Iterator[Input]:
    """Every input in the order given, as a lazy stream (consume it once); folders and globs are
    sorted so output order is stable. A bad table header raises DataError here, before any input."""
    return itertools.chain.from_iterable([_from_argument(arg, columns) for arg in arguments])

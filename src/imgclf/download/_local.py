"""Local sources: folders, archives and tables that name local files become download items.

`_items.iter_items` turns every source into chunks of `Item` (one future manifest row) and `Skipped`
(a file that gets no row, listed in download_report.json). The worker side, `_read.read_local`,
reads one item's bytes for `_store.process_body`, the same validation as a downloaded body.

Folder layout (ImageFolder, as torchvision, fastai and Ultralytics read it):
  - a top-level folder named train, val/valid/validation/dev or test (any case; see
    sources.SPLIT_ALIASES) is a split folder and its sub-folders are labels; any other
    top-level folder is a label of the source's own split (its name: `test/`, `test.zip`,
    else train);
  - the label is the class folder's name verbatim; files in deeper sub-folders belong to it;
  - a source whose only visible entry is one folder that itself holds folders (`flowers.zip` ->
    `flowers/train/...`, `flowers/README.txt`) is read from inside that folder (repeatedly);
    a single folder holding only files (`cats.zip` -> `cats/1.jpg`) is a label;
  - the content decides, never the extension: every regular file in a class folder becomes a
    row (an image without an extension is fine; `notes.txt` ends `not_image`);
  - not rows, but listed: hidden entries (a name starting with "."; `__MACOSX`, `Thumbs.db`,
    `desktop.ini`, `@eaDir`), files outside class folders, non-regular files (FIFO, socket,
    device, broken symlink: never opened), folders reached twice (a symlink loop), names that
    are not valid UTF-8, unreadable folders. A class folder whose name holds a control
    character is refused with one line when the rows are stored (imgclf.untrusted: a label is
    refused, never cut), as a table's label is.
Symlinks whose target stays inside the source folder are read (a file's target is validated
like any file); symlinks to folders are followed once per real folder ((device, inode) pairs
already visited are not entered again), so a loop ends. A symlink that leaves the source folder
(a class folder linked to /etc) is listed, not read (`outside_link`), unless --follow-links; one
into /proc, /dev or /sys (/dev/fd reaches this process's own open files) is never read.
Archives found inside a folder are files like any other (`not_image`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from imgclf import sources
from imgclf.download._pseudo import is_pseudo, passes_pseudo, under
from imgclf.errors import DataError

HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir", "$RECYCLE.BIN",
                          "System Volume Information"})
_MAX_WRAPPERS = 8  # wrapper folders stripped at most (flowers/flowers/train/...)


class Item(NamedTuple):
    """One future manifest row. `url` is the manifest's `url`: the locator of the file."""

    source: str  # the source as given: folder, archive or table
    url: str  # http(s) URL, local path (folder path as given + relative path), or `archive!member`
    label: str
    split: str
    kind: str = "url"  # url | file | zip | tar (seekable member) | tarstream (compressed tar member)
    file: str = ""  # absolute path the worker opens (the file, or the archive)
    member: str = ""  # archive member name, as stored
    offset: int = -1  # zip: index in the central directory; tar: offset of the member's data
    size: int = -1  # with `stamp`: the signature that tells a changed file (re-validated) from a seen one
    stamp: int = -1  # files: mtime_ns; zip: CRC-32; tar: mtime
    status: str | None = None  # a verdict known before reading (too_large by declared size, ...)
    error: str = ""


class Skipped(NamedTuple):
    """A file that gets no manifest row, and why (download_report.json lists them)."""

    source: str
    path: str
    kind: str  # hidden | outside_class_folders | not_regular_file | symlink_loop | unsafe_member | ...
    reason: str


class LocalRef(NamedTuple):
    """What a worker needs to read one local item (small, picklable: no bytes cross the pipe)."""

    kind: str
    file: str
    member: str
    offset: int
    size: int


Chunk = list[Item | Skipped]


@dataclass(frozen=True)
class Layout:
    """Where labels and splits come from in one folder tree or archive."""

    default_split: str
    wrapper: tuple[str, ...] = ()  # leading folders to look through

    def place(self, parts: tuple[str, ...]) -> tuple[str, str] | None:
        """(label, split) of a file at `parts` below the source root; None: outside class folders."""
        parts = parts[len(self.wrapper):] if parts[: len(self.wrapper)] == self.wrapper else parts
        split = self.default_split
        if len(parts) > 1 and parts[0].lower() in sources.SPLIT_ALIASES:
            split, parts = sources.SPLIT_ALIASES[parts[0].lower()], parts[1:]
        if len(parts) < 2:
            return None
        return parts[0], split


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_NAMES


def utf8_ok(text: str) -> bool:
    """False for names holding undecodable bytes (surrogate escapes): they cannot be stored."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def wrapper_of(files: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Leading folders that every visible file sits under and that hold folders (see module doc)."""
    paths = list(files)
    prefix: tuple[str, ...] = ()
    while len(prefix) < _MAX_WRAPPERS and paths:
        n = len(prefix)
        first = paths[0][n] if len(paths[0]) > n + 1 else None
        if (first is None or first.lower() in sources.SPLIT_ALIASES
                or any(len(p) < n + 2 or p[n] != first for p in paths)
                or not any(len(p) >= n + 3 for p in paths)):
            break
        prefix += (first,)
    return prefix


# -- folders --------------------------------------------------------------------------------------
def _visible(path: str) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(path) if not is_hidden(e.name)]
    except OSError:
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def folder_wrapper(root: Path) -> tuple[str, ...]:
    """The folder version of `wrapper_of`, from directory listings (no full walk needed)."""
    prefix: tuple[str, ...] = ()
    current = str(root)
    while len(prefix) < _MAX_WRAPPERS:
        entries = _visible(current)
        if len(entries) != 1 or not _is_dir(entries[0]) or entries[0].name.lower() in sources.SPLIT_ALIASES:
            break
        if not any(_is_dir(e) for e in _visible(entries[0].path)):
            break
        prefix += (entries[0].name,)
        current = entries[0].path
    return prefix


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


class _Dir(NamedTuple):
    parts: tuple[str, ...]  # below the source root
    shown: str  # as the user gave the root, joined with parts
    absolute: str
    place: tuple[str, str] | None  # (label, split) of the files directly in it
    entries: Iterator[os.DirEntry[str]]


def _link_problem(entry: os.DirEntry[str], real_root: str, follow_links: bool) -> Skipped | None:
    """Why a symlink entry is not followed (kind, reason), or None to follow it."""
    target = os.path.realpath(entry.path)
    if not os.path.lexists(target):
        return None  # broken: the stat below lists it as such
    if is_pseudo(target) or passes_pseudo(entry.path):
        return Skipped("", "", "special_path", "a symlink into /proc, /dev or /sys (never read)")
    if not follow_links and not under(target, real_root):
        return Skipped("", "", "outside_link", "a symlink that leaves the source folder (not followed; "
                                               "pass --follow-links to read it)")
    return None


def walk_folder(root: Path, follow_links: bool = False) -> Iterator[Item | Skipped]:
    """Every entry under `root`, in sorted order (stable row numbers), as Item or Skipped."""
    shown = str(root)
    real_root = os.path.realpath(root)
    if is_pseudo(real_root) or passes_pseudo(str(root)):
        raise DataError(f"{root}: a folder under /proc, /dev or /sys cannot be a source")
    layout = Layout(sources.split_from_stem(root), folder_wrapper(root))
    try:
        top = os.stat(root)
        stack = [_Dir((), shown, os.path.abspath(root), layout.place(("",)), _sorted_entries(str(root)))]
    except OSError as err:
        raise DataError(f"{root}: cannot list the folder ({err.strerror})") from None
    visited = {(top.st_dev, top.st_ino)}
    while stack:
        folder = stack[-1]
        entry = next(folder.entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        where = os.path.join(folder.shown, name)
        if not utf8_ok(name):
            yield Skipped(shown, where.encode("utf-8", "backslashreplace").decode(), "bad_name",
                          "the name is not valid UTF-8; rename it")
            continue
        if is_hidden(name):
            yield Skipped(shown, where, "hidden", "hidden or system entry (not read)")
            continue
        if _is_link(entry) and (refused := _link_problem(entry, real_root, follow_links)) is not None:
            yield refused._replace(source=shown, path=where)
            continue
        try:
            st = entry.stat()  # follows symlinks
        except OSError as err:
            reason = "broken symlink" if entry.is_symlink() else f"cannot stat: {err.strerror}"
            yield Skipped(shown, where, "not_regular_file", reason)
            continue
        if stat.S_ISREG(st.st_mode):
            if folder.place is None:
                yield Skipped(shown, where, "outside_class_folders", "not inside a class folder")
            else:
                yield Item(shown, where, *folder.place, "file", os.path.join(folder.absolute, name), "", -1,
                           st.st_size, st.st_mtime_ns)
        elif not stat.S_ISDIR(st.st_mode):
            yield Skipped(shown, where, "not_regular_file", f"{kind_of(st.st_mode)} (never opened)")
        elif (st.st_dev, st.st_ino) in visited:
            yield Skipped(shown, where, "symlink_loop", "a folder already read (symlink loop or second link)")
        else:
            visited.add((st.st_dev, st.st_ino))
            parts = (*folder.parts, name)
            try:
                entries = _sorted_entries(entry.path)
            except OSError as err:
                yield Skipped(shown, where, "unreadable_folder", f"cannot list: {err.strerror}")
                continue
            stack.append(_Dir(parts, where, os.path.join(folder.absolute, name), layout.place((*parts, "")),
                              entries))


def _is_link(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _sorted_entries(path: str) -> Iterator[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return iter(sorted(it, key=lambda e: e.name))


# -- tables with a path column ---------------------------------------------------------------------
def table_items(frame: pd.DataFrame, table: Path) -> list[Item]:
    """Rows of a table chunk as items: a non-empty `path` is a local file (relative to the table)."""
    base, shown_base = os.path.abspath(table.parent), str(table.parent)
    out: list[Item] = []
    for source, url, label, split, path in zip(frame["source"].tolist(), frame["url"].tolist(),
                                               frame["label"].tolist(), frame["split"].tolist(),
                                               frame["path"].tolist(), strict=True):
        if not path:
            out.append(Item(source, url, label, split))
            continue
        if problem := sources.cut_problem(path, "path", sources.MAX_PATH_BYTES):
            out.append(Item(source, path, label, split, "file", "", status="unreadable", error=problem))
            continue
        if "\x00" in path:  # no file has such a name (and os.stat would raise ValueError)
            out.append(Item(source, path.replace("\x00", "\\x00"), label, split, "file", "", status="unreadable",
                            error="the path holds a NUL character"))
            continue
        where = path if os.path.isabs(path) else os.path.normpath(os.path.join(shown_base, path))
        out.append(_file_item(source, where, label, split, os.path.join(base, path)))
    return out


def _file_item(source: str, where: str, label: str, split: str, absolute: str) -> Item:
    """A table's local file: its signature now; a verdict when it cannot be a file we read."""
    if passes_pseudo(absolute):
        # /dev/fd/N, /proc/self/...: this process's own open files and memory, never input data
        return Item(source, where, label, split, "file", absolute, status="unreadable",
                    error="a path into /proc, /dev or /sys (never read)")
    try:
        st = os.stat(absolute)
    except OSError as err:
        return Item(source, where, label, split, "file", absolute, status="unreadable",
                    error=f"cannot read: {err.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return Item(source, where, label, split, "file", absolute, "", -1, st.st_size, st.st_mtime_ns,
                    "unreadable", f"not a regular file: {kind_of(st.st_mode)} (never opened)")
    return Item(source, where, label, split, "file", absolute, "", -1, st.st_size, st.st_mtime_ns)


def check_out_dir(paths: list[Path], data_dir: Path) -> None:
    """Nothing is written into a source: refuse --out inside a source folder (and the reverse);
    a data directory is not an image folder."""
    out = data_dir.resolve()
    for path in paths:
        if path.is_dir():
            if (path / "manifest.parquet").is_file():
                raise DataError(f"{path} is a data directory written by `imgclf download`, not an image folder; "
                                f"use it as --data")
            src = path.resolve()
            if out == src or out.is_relative_to(src):
                raise DataError(f"--out {data_dir} is inside the source folder {path}; nothing is written "
                                f"into a source: choose an --out outside it (e.g. {path.name}_data)")
            if src.is_relative_to(out):
                raise DataError(f"source {path} is inside --out {data_dir}; use another --out")

"""Archives as sources: zip and tar members are read in place, never unpacked, never trusted.

A member name only ever becomes a label, a split and the manifest's locator (`archive!member`);
nothing is written under a member's name. What reaches DATA_DIR is a member's bytes, after
they have been validated, re-hashed and stored as images/<sha[:2]>/<sha>.<ext> like any
downloaded body. Refused, listed in download_report.json (`unsafe_member`), never read:
  - names that are absolute (`/x`, `C:x`), climb out (`..` anywhere, `\\` counted as `/`) or hold NUL;
  - symlink and hardlink members, devices, FIFOs, sparse and unknown member types;
  - zip members whose stored data overlaps another member's (the overlapping-file zip bomb).
Bounded (the member ends `too_large`, or the rest of the archive is not read):
  - each member: --max-bytes decompressed (declared size checked first, reads capped anyway);
  - each zip member over 1 MiB: at most 100:1 decompressed to compressed;
  - each archive: at most max(1 GiB, 100 x the archive's size) decompressed in all (for a
    compressed tar, the position in the decompressed stream, which also bounds skipping).
  - metadata: a member name over `MAX_NAME_BYTES` is refused (`unsafe_member`, stored cut), and
    the names of one archive may hold at most max(64 MiB, the archive's size) bytes in all (64
    bytes counted per member on top): past that the rest is not read. A .tar.gz of 100,000 empty
    members with 8 KB names (2.2 MB) cost 2.8 GB of memory and a 3.3 GB state before this.
  - a GNU long-name or pax header over MAX_HEADER_BYTES stops the listing as a corrupt archive
    does (tarfile reads such a header whole: a 20 MB name is 20 KB of gzip).
Two members with the same name are two rows (the second locator gets ` (#2)`), never one
`duplicate`: a compressed tar's members are matched by their position in the stream, not by name.

Zip members and members of an uncompressed .tar are read by the worker processes themselves
(by central-directory index or data offset); a compressed tar (.tar.gz, .tgz, .tar.bz2,
.tar.xz, .tar.zst through the `zstandard` package) can only be read front to back, so the
parent streams it once and hands the wanted members' bytes to the workers.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from imgclf import sources
from imgclf.download._local import Item, Layout, Skipped, is_hidden, utf8_ok, wrapper_of
from imgclf.errors import DataError, first_line

RATIO_LIMIT = 100
RATIO_FLOOR = 1 << 20
TOTAL_FLOOR = 1 << 30
TOTAL_RATIO = 100
MAX_NAME_BYTES = 4096  # PATH_MAX: no file system stores a longer path
NAMES_FLOOR = 64 << 20
MEMBER_OVERHEAD = 64  # bytes counted per member besides its name (a listed entry's own cost)
MAX_HEADER_BYTES = 1 << 20  # a GNU long-name or pax header (a name, a few times over, fits)
_DRIVE = re.compile(r"^[A-Za-z]:")
READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError,
                NotImplementedError, RuntimeError, ValueError)
_TAR_MODES = {"tar.gz": "r|gz", "tar.bz2": "r|bz2", "tar.xz": "r|xz"}
# The first bytes decide how an archive is read (a .tgz that is a plain tar, a .tar that is gzipped).
_MAGIC = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "tar.gz"), (b"BZh", "tar.bz2"),
          (b"\xfd7zXZ\x00", "tar.xz"), (b"\x28\xb5\x2f\xfd", "tar.zst"))


class Entry(NamedTuple):
    """One member as listed: its safe path parts, or the problem that makes it unsafe."""

    name: str
    parts: tuple[str, ...]
    problem: str  # "" when safe to read
    is_file: bool
    offset: int
    size: int
    stamp: int
    status: str | None = None
    error: str = ""


def sniff(path: Path | str) -> str:
    """The archive's real format from its first bytes; the name's format when they say nothing."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    found = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    return found or ("tar" if sources.archive_format(Path(path)) != "zip" else "zip")


def total_cap(path: Path | str) -> int:
    return max(TOTAL_FLOOR, TOTAL_RATIO * os.path.getsize(path))


class _NameBudget:
    """Counts the metadata bytes of one archive's listing (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.cap = max(NAMES_FLOOR, os.path.getsize(path))
        self.used = 0

    def over(self, name: str) -> bool:
        """Count one member; True once the archive's names passed the cap."""
        self.used += len(name.encode("utf-8", "surrogateescape")) + MEMBER_OVERHEAD
        return self.used > self.cap

    def stop(self) -> Entry:
        return Entry("", (), f"member names exceed {self.cap} bytes in all (the metadata budget of one archive); "
                             "the rest is not read", False, -1, -1, -1)


def _long_name(name: str) -> Entry | None:
    """A refused entry for a name too long to be a path (stored cut, so the state stays small)."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if size <= MAX_NAME_BYTES:
        return None
    return Entry(sources.cut_cell(name), (), f"member name of {size} bytes (limit {MAX_NAME_BYTES})", False,
                 -1, -1, -1)


def safe_parts(name: str) -> tuple[tuple[str, ...], str]:
    """The path parts of a member name, or ((), why it is refused)."""
    text = name.replace("\\", "/")
    if "\x00" in text:
        return (), "NUL byte in the member name"
    if text.startswith("/") or _DRIVE.match(text):
        return (), "absolute member name"
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        return (), "member name climbs out with '..'"
    if not parts:
        return (), "empty member name"
    return parts, ""


# -- listing ----------------------------------------------------------------------------------------
def list_archive(path: Path, max_bytes: int) -> Iterator[Item | Skipped]:
    """Every member of the archive at `path` as Item or Skipped, in archive order."""
    fmt = sniff(path)
    kind = {"zip": "zip", "tar": "tar"}.get(fmt, "tarstream")
    entries = list(_zip_entries(path, max_bytes) if fmt == "zip" else _tar_entries(path, fmt, max_bytes))
    shown, absolute = str(path), os.path.abspath(path)
    visible = [e.parts for e in entries if e.is_file and not e.problem and not any(map(is_hidden, e.parts))]
    layout = Layout(sources.split_from_stem(path), wrapper_of(visible))
    hidden_seen: set[tuple[str, ...]] = set()
    taken: set[str] = set()  # locators given: a repeated member name is another member, another row
    for e in entries:
        where = base = f"{shown}!{e.name}"
        if e.is_file and not e.problem:
            copy = 1
            while where in taken:
                copy += 1
                where = f"{base} (#{copy})"
            taken.add(where)
        if e.problem:
            yield Skipped(shown, where, "unsafe_member" if e.parts or e.name else "unreadable_archive", e.problem)
        elif not e.is_file:
            continue
        elif not all(map(utf8_ok, e.parts)):
            yield Skipped(shown, where, "bad_name", "the name is not valid UTF-8")
        elif (top := _hidden_prefix(e.parts)) is not None:
            if top not in hidden_seen:  # __MACOSX/ mirrors every file: list the folder once
                hidden_seen.add(top)
                yield Skipped(shown, f"{shown}!{'/'.join(top)}", "hidden", "hidden or system entry (not read)")
        elif (place := layout.place(e.parts)) is None:
            yield Skipped(shown, where, "outside_class_folders", "not inside a class folder")
        else:
            yield Item(shown, where, place[0], place[1], kind, absolute, e.name, e.offset, e.size, e.stamp,
                       e.status, e.error)


def _hidden_prefix(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    for i, part in enumerate(parts):
        if is_hidden(part):
            return parts[: i + 1]
    return None


def zip_name(info: zipfile.ZipInfo) -> str:
    """The member name: UTF-8 when flagged or when the raw bytes are UTF-8 (common, unflagged)."""
    if info.flag_bits & 0x800:
        return info.orig_filename
    try:
        return info.orig_filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.orig_filename


def _unix_mode(info: zipfile.ZipInfo) -> int:
    return info.external_attr >> 16 if info.create_system == 3 else 0


def _zip_type_problem(info: zipfile.ZipInfo) -> str:
    kind = stat.S_IFMT(_unix_mode(info))
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return ""
    if kind == stat.S_IFLNK:
        return "symlink member (not followed)"
    return "device, FIFO or socket member"


def _overlapping(infos: list[zipfile.ZipInfo]) -> set[int]:
    """Members whose data overlaps another's: the overlapping-file zip bomb (CVE-2024-0450)."""
    order = sorted(range(len(infos)), key=lambda i: infos[i].header_offset)
    bad: set[int] = set()
    end, owner = -1, -1
    for i in order:
        info = infos[i]
        if info.header_offset < end:
            bad.update((i, owner))
        # 30 bytes of local header at least: a lower bound of the member's extent.
        if info.header_offset + 30 + info.compress_size > end:
            end, owner = info.header_offset + 30 + info.compress_size, i
    return bad


def _zip_entries(path: Path, max_bytes: int) -> Iterator[Entry]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except READ_ERRORS as err:
        raise DataError(f"{path}: not a readable zip archive ({first_line(err)})") from None
    overlapping, cap, total, budget = _overlapping(infos), total_cap(path), 0, _NameBudget(path)
    for index, info in enumerate(infos):
        name = zip_name(info)
        if budget.over(name):
            yield budget.stop()
            return
        if (refused := _long_name(name)) is not None:
            yield refused
            continue
        parts, problem = safe_parts(name)
        is_file = not info.is_dir() and stat.S_IFMT(_unix_mode(info)) != stat.S_IFDIR
        if not is_file and not parts and problem == "empty member name":
            continue  # "./": harmless, and folders are never created anyway
        problem = problem or _zip_type_problem(info)
        if not problem and index in overlapping:
            problem = "its data overlaps another member's (a zip bomb trick)"
        status, error = None, ""
        if problem or not is_file:
            pass
        elif info.flag_bits & 0x1:
            status, error = "unreadable", "encrypted member (no password is asked for)"
        elif info.file_size > max_bytes:
            status, error = "too_large", f"declares {info.file_size} bytes, over --max-bytes {max_bytes}"
        elif info.file_size > RATIO_FLOOR and info.file_size > RATIO_LIMIT * max(1, info.compress_size):
            status, error = "too_large", (f"compression ratio over {RATIO_LIMIT}:1 "
                                          f"({info.compress_size} -> {info.file_size} bytes): a zip bomb?")
        elif total + info.file_size > cap:
            status, error = "too_large", f"the archive decompresses to more than {cap} bytes in all"
        else:
            total += info.file_size
        yield Entry(name, parts, problem, is_file, index, info.file_size, info.CRC, status, error)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name header or a pax header whole, before any check of ours: a
    20 MB name is 20 MB of memory (a gzip of it, 20 KB). Such headers over MAX_HEADER_BYTES stop
    the listing as a corrupt archive does. (Private hooks of tarfile, stable since Python 2.)"""

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        _check_header(self)
        return super()._proc_gnulong(tarfile_)  # type: ignore[misc]

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        _check_header(self)
        return super()._proc_pax(tarfile_)  # type: ignore[misc]


def _check_header(info: tarfile.TarInfo) -> None:
    if info.size > MAX_HEADER_BYTES:
        raise tarfile.HeaderError(f"an extended header (long name or pax) of {info.size} bytes, over "
                                  f"{MAX_HEADER_BYTES}")


@contextlib.contextmanager
def open_tar(path: Path | str, fmt: str) -> Iterator[tarfile.TarFile]:
    """A TarFile: random access for a plain .tar, a forward-only stream for compressed ones."""
    with contextlib.ExitStack() as stack:
        if fmt == "tar":
            fileobj: IO[bytes] | None = None
            mode = "r:"
        elif fmt == "tar.zst":
            try:
                import zstandard
            except ImportError:
                raise DataError(f"{path}: reading .tar.zst needs the zstandard package "
                                "(pip install zstandard)") from None
            raw = stack.enter_context(open(path, "rb"))
            fileobj = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
            mode = "r|"
        else:
            fileobj, mode = None, _TAR_MODES[fmt]
        # backslashreplace: names with bytes that are not UTF-8 still make one stable string.
        tar = tarfile.open(None if fileobj else path, mode, fileobj=fileobj, errors="backslashreplace",
                           tarinfo=_BoundedTarInfo)
        stack.enter_context(tar)
        yield tar


def tar_type_problem(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "sparse member (not supported)" if member.issparse() else ""
    if member.isdir():
        return ""
    if member.issym():
        return f"symlink member (-> {member.linkname[:80]!r}) not followed"
    if member.islnk():
        return f"hardlink member (-> {member.linkname[:80]!r}) not followed"
    if member.ischr() or member.isblk():
        return "device member"
    if member.isfifo():
        return "FIFO member"
    return f"unsupported member type {member.type!r}"


def iter_tar(tar: tarfile.TarFile, cap: int) -> Iterator[tarfile.TarInfo | str]:
    """Members in order; a final string says why reading stopped early (corrupt, cut, over the cap)."""
    count = 0
    while True:
        try:
            member = tar.next()
        except READ_ERRORS as err:
            yield f"the archive is corrupt or cut after {count} member(s): {first_line(err)}"
            return
        if member is None:
            return
        tar.members.clear()  # a TarFile keeps every header it read: memory would grow with the archive
        if member.offset_data + member.size > cap:
            yield f"the archive decompresses to more than {cap} bytes; the rest is not read"
            return
        count += 1
        yield member


def _tar_entries(path: Path, fmt: str, max_bytes: int) -> Iterator[Entry]:
    try:
        budget = _NameBudget(path)
        with open_tar(path, fmt) as tar:
            for member in iter_tar(tar, total_cap(path)):
                if isinstance(member, str):
                    yield Entry("", (), member, False, -1, -1, -1)
                    return
                if budget.over(member.name):
                    yield budget.stop()
                    return
                if (refused := _long_name(member.name)) is not None:
                    yield refused
                    continue
                parts, problem = safe_parts(member.name)
                if member.isdir() and not parts and problem == "empty member name":
                    continue  # "./" (tar -C dir .): harmless, and folders are never created anyway
                problem = problem or tar_type_problem(member)
                status, error = None, ""
                if not problem and member.isreg() and member.size > max_bytes:
                    status, error = "too_large", f"{member.size} bytes, over --max-bytes {max_bytes}"
                yield Entry(member.name, parts, problem, member.isreg(), member.offset_data, member.size,
                            int(member.mtime), status, error)
    except READ_ERRORS as err:  # cannot even open it
        raise DataError(f"{path}: not a readable {fmt} archive ({first_line(err)})") from None

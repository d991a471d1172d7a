"""Worker side of local sources: the bytes of one listed item (a file, a zip member, a tar member),
or why not, as a value (`images.Rejected`), never an exception.

The listing side (`_local` for folders and tables, `_archive` for archives) hands each item over as a
`LocalRef`; this module reads it back, rechecking what may have changed since it was listed (a file
swapped for a FIFO, an archive rewritten). Split from the listing modules so that reading depends on
both and neither depends on the other.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator

from imgclf.download._archive import READ_ERRORS, iter_tar, open_tar, sniff, tar_type_problem, total_cap, zip_name
from imgclf.download._local import LocalRef, kind_of
from imgclf.errors import DataError, first_line
from imgclf.images import Rejected

READ_CHUNK = 1 << 16


# -- files ------------------------------------------------------------------------------------
def read_local(ref: LocalRef, max_bytes: int) -> bytes | Rejected:
    """The bytes of one local item, or why not (a value, never an exception)."""
    if ref.kind == "file":
        return read_file(ref.file, max_bytes)
    return read_member(ref, max_bytes)


def read_file(path: str, max_bytes: int) -> bytes | Rejected:
    """Read a regular file; anything else (FIFO, device, socket) is refused before it is opened."""
    try:
        st = os.stat(path)
    except OSError as err:
        return Rejected("unreadable", f"cannot read: {err.strerror}")
    if not stat.S_ISREG(st.st_mode):
        return Rejected("unreadable", f"not a regular file: {kind_of(st.st_mode)} (never opened)")
    if st.st_size > max_bytes:
        return Rejected("too_large", f"{st.st_size} bytes, over --max-bytes {max_bytes}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        return Rejected("unreadable", f"cannot read: {err.strerror}")
    try:
        st = os.fstat(fd)  # swapped for something else between stat and open?
        if not stat.S_ISREG(st.st_mode):
            return Rejected("unreadable", f"not a regular file: {kind_of(st.st_mode)}")
        return read_capped(fd, st.st_size, max_bytes)
    except OSError as err:
        return Rejected("unreadable", f"cannot read: {err.strerror}")
    finally:
        os.close(fd)


def read_capped(fd: int, expected: int, max_bytes: int) -> bytes | Rejected:
    """Read to EOF, at most max_bytes (a file that grows while read, or /proc-like sizes of 0)."""
    data = os.read(fd, min(expected, max_bytes) + 1)
    if len(data) == expected:  # the usual case: exactly the size stat gave
        return data
    parts, total = [data], len(data)
    while data and total <= max_bytes:
        data = os.read(fd, READ_CHUNK)
        parts.append(data)
        total += len(data)
    if total > max_bytes:
        return Rejected("too_large", f"over --max-bytes {max_bytes}")
    return b"".join(parts)


# -- archive members ----------------------------------------------------------------------------------------
def stream_members(path: str, wanted: dict[int, tuple[int, str, str]],
                   max_bytes: int) -> Iterator[tuple[int, str, bytes | Rejected]]:
    """Read a compressed tar front to back; yield (id, url, bytes or why not) for each wanted member,
    `wanted` being {data offset in the stream: (id, url, member name)}: by position, so two members
    with the same name are two members."""
    fmt = sniff(path)
    reason = "not found in the archive any more"
    try:
        with open_tar(path, fmt) as tar:
            for member in iter_tar(tar, total_cap(path)):
                if isinstance(member, str):
                    reason = member
                    break
                target = wanted.get(member.offset_data)
                if target is not None and target[2] == member.name:
                    del wanted[member.offset_data]
                    yield target[0], target[1], _read_tar_member(tar, member, max_bytes)
                    if not wanted:
                        return
    except (*READ_ERRORS, DataError) as err:
        reason = f"cannot read the archive: {first_line(err)}"
    for url_id, url, _ in wanted.values():
        yield url_id, url, Rejected("unreadable", reason)


def _read_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, max_bytes: int) -> bytes | Rejected:
    if tar_type_problem(member) or not member.isreg():
        return Rejected("unreadable", "the member changed type since it was listed")
    if member.size > max_bytes:
        return Rejected("too_large", f"{member.size} bytes, over --max-bytes {max_bytes}")
    try:
        fh = tar.extractfile(member)
        data = fh.read(member.size) if fh is not None else b""
    except READ_ERRORS as err:
        return Rejected("unreadable", f"cannot extract: {first_line(err)}")
    if len(data) != member.size:
        return Rejected("unreadable", "the archive ends inside this member")
    return data


class _OpenArchives:
    """Archives a worker process has open (a few; forked children start with their own)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep, self.pid = keep, os.getpid()
        self.zips: dict[str, zipfile.ZipFile] = {}
        self.fds: dict[str, int] = {}

    def _fresh(self) -> None:
        if self.pid != os.getpid():  # inherited across fork: handles share file offsets, drop them
            self.pid, self.zips, self.fds = os.getpid(), {}, {}

    def zip(self, path: str) -> zipfile.ZipFile:
        self._fresh()
        if path not in self.zips:
            if len(self.zips) >= self.keep:
                self.zips.pop(next(iter(self.zips))).close()
            self.zips[path] = zipfile.ZipFile(path)
        return self.zips[path]

    def fd(self, path: str) -> int:
        self._fresh()
        if path not in self.fds:
            if len(self.fds) >= self.keep:
                os.close(self.fds.pop(next(iter(self.fds))))
            self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self.fds[path]


_OPEN = _OpenArchives()


def read_member(ref: LocalRef, max_bytes: int) -> bytes | Rejected:
    """Worker side: one zip member (by index) or plain-tar member (by data offset)."""
    try:
        if ref.kind == "zip":
            return _read_zip_member(_OPEN.zip(ref.file), ref, max_bytes)
        if ref.size > max_bytes:
            return Rejected("too_large", f"{ref.size} bytes, over --max-bytes {max_bytes}")
        data = os.pread(_OPEN.fd(ref.file), ref.size, ref.offset)
    except READ_ERRORS as err:
        return Rejected("unreadable", f"cannot extract: {first_line(err)}")
    if len(data) != ref.size:
        return Rejected("unreadable", "the archive is shorter than when it was listed")
    return data


def _read_zip_member(zf: zipfile.ZipFile, ref: LocalRef, max_bytes: int) -> bytes | Rejected:
    infos = zf.infolist()
    info = infos[ref.offset] if 0 <= ref.offset < len(infos) else None
    if info is None or zip_name(info) != ref.member:
        return Rejected("unreadable", "the archive changed since it was listed; run the command again")
    if info.file_size > max_bytes:
        return Rejected("too_large", f"declares {info.file_size} bytes, over --max-bytes {max_bytes}")
    with zf.open(info) as fh:  # zipfile stops at the declared size and checks the CRC
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        return Rejected("too_large", f"over --max-bytes {max_bytes}")
    return data

"""Where validated images are stored: one small interface, two layouts, a local folder or a URL.

    writer = FilesWriter("data")                                   # --layout files (default)
    writer = TarShardWriter("s3://bucket/data", "shards/00007.tar", work_dir)   # --layout tar
    loc = writer.write(sha256, "jpg", data)     # -> Location(path, shard, offset)
    final = writer.close()                      # -> {path: Location} with the final offsets

`FilesWriter` is today's layout: DATA_DIR/images/<sha[:2]>/<sha>.<ext>, one file per image,
content-addressed, each written to a temporary name and renamed (local) or PUT whole (object
storage): a location it returns is final at once.

`TarShardWriter` writes one tar per shard. Members are appended to a local spool file as they
come (any order), and `close()` writes the tar in member-name order with fixed metadata (mtime 0,
uid/gid 0, no user names, mode 0644, ustar), so the same images give the same bytes whatever
order they arrived in. Member names are the files layout's paths (`images/ab/ab12...jpg`):
WebDataset reads the tar as samples keyed `images/ab/ab12...` with one image field. The tar is
written to DATA_DIR/.tmp/ and renamed into place when complete (local), or built in the local
work folder and uploaded in one PUT (object storage): a reader never sees a partial shard. The
final byte offset of each member's data is known only then, so `write` returns the member's
location with offset -1 and `close` returns the final ones; the caller commits the shard's rows
(see imgclf.manifest: shard, offset, bytes) only after `close` returned. A shard that was never
closed (killed) leaves only its spool and .part file, removed by the next run; its rows were never
committed, so they are fetched again into a new shard.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imgclf import storage
from imgclf.download._store import IMAGES_DIR, TMP_DIR, write_file

SHARDS_DIR = "shards"
LAYOUTS = ("files", "tar")


@dataclass(frozen=True)
class Location:
    """Where one stored image is, relative to DATA_DIR (the manifest's path, shard, offset)."""

    path: str  # files: the file; tar: the member name (the same name the files layout would use)
    shard: str = ""  # tar: the shard, e.g. "shards/00007.tar"
    offset: int = -1  # tar: byte offset of the member's data inside the shard (-1 until closed)


class Writer(Protocol):
    def write(self, sha256: str, ext: str, data: bytes) -> Location: ...

    def close(self) -> dict[str, Location]: ...

    def abort(self) -> None: ...


def image_name(sha256: str, ext: str) -> str:
    """The content-addressed name of a stored image (a file, or a tar member)."""
    return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}.{ext}"


def shard_name(number: int) -> str:
    return f"{SHARDS_DIR}/{number:05d}.tar"


def shard_number(name: str) -> int:
    """The number of a shard name from shard_name (-1 for anything else)."""
    stem = name.removeprefix(f"{SHARDS_DIR}/").removesuffix(".tar")
    return int(stem) if stem.isdigit() and name == shard_name(int(stem)) else -1


class FilesWriter:
    """One file per image under DATA_DIR/images/ (local folder or URL); locations are final at once."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = os.fspath(out)

    def write(self, sha256: str, ext: str, data: bytes) -> Location:
        rel = image_name(sha256, ext)
        write_file(self.out, rel, data)
        return Location(rel)

    def close(self) -> dict[str, Location]:
        return {}

    def abort(self) -> None:
        pass


class TarShardWriter:
    """One deterministic tar: DATA_DIR/<name>, complete or absent (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str], name: str,
                 work_dir: str | os.PathLike[str] | None = None) -> None:
        """`work_dir`: a local folder for the spool and the unfinished tar when `out` is a URL;
        for a local `out` they go to out/.tmp (same file system, so the final rename is atomic)."""
        self.out, self.name = os.fspath(out), storage.confined(name)
        if storage.is_url(self.out) and work_dir is None:
            raise ValueError("TarShardWriter: a URL out needs a local work_dir")
        self._tmp_dir = Path(work_dir if storage.is_url(self.out) else self.out) / TMP_DIR
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._spool_path = self._tmp_dir / f"{uuid.uuid4().hex}.spool"
        self._spool = open(self._spool_path, "w+b")  # noqa: SIM115 - lives until close/abort
        self._members: dict[str, tuple[int, int]] = {}  # name -> (offset in the spool, size)
        self._end = 0

    def __len__(self) -> int:
        return len(self._members)

    @property
    def size(self) -> int:
        """Bytes of member data written so far."""
        return self._end

    def write(self, sha256: str, ext: str, data: bytes) -> Location:
        rel = image_name(sha256, ext)
        if rel not in self._members:  # same name, same content: one member
            self._spool.write(data)
            self._members[rel] = (self._end, len(data))
            self._end += len(data)
        return Location(rel, self.name, -1)

    def close(self) -> dict[str, Location]:
        """Write the tar in name order, move it into place, return every member's final location."""
        try:
            if not self._members:
                return {}
            self._spool.flush()
            part = self._tmp_dir / f"{uuid.uuid4().hex}.tar.part"
            try:
                offsets = _write_tar(part, self._spool, self._members)
                _publish(part, self.out, self.name)
            finally:
                part.unlink(missing_ok=True)  # after a rename too: see _publish
            return {rel: Location(rel, self.name, offset) for rel, offset in offsets.items()}
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the spool; nothing was published."""
        with contextlib.suppress(OSError, ValueError):
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(part: Path, spool: io.BufferedRandom, members: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Write members in name order to `part`; return each member's data offset."""
    offsets: dict[str, int] = {}
    fd = spool.fileno()
    with open(part, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for rel in sorted(members):
            start, size = members[rel]
            info = _tar_info(rel, size)
            header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
            offsets[rel] = tar.offset + header
            tar.addfile(info, io.BytesIO(os.pread(fd, size, start)))
        # tarfile ends with two zero blocks and pads to a 10 KiB record: fixed, so deterministic.
    return offsets


def _publish(part: Path, out: str, name: str) -> None:
    """Make the finished tar visible under its final name, in one step."""
    if storage.is_url(out):
        storage.upload(part, out, name)
        return
    final = Path(out) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


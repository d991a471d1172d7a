"""Where a data directory lives, and the one reader of a row's image bytes (core layer).

DATA_DIR is a local folder or an fsspec URL (`s3://bucket/prefix`; credentials and endpoint come
from the environment as boto and s3fs read them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL, AWS_PROFILE ...). A stored image is either a file,
`DATA_DIR/<path>` (layout `files`), or a member of a tar shard, `offset`..`offset + bytes` of
`DATA_DIR/<shard>` (layout `tar`; see imgclf.manifest). `read_row` is the one reader train,
evaluate, audit and the report thumbnails use: a local file read, a local `pread`, or one ranged
GET on object storage, so a reader never needs a whole shard and never holds a dataset in RAM.

Every relative name read from a manifest goes through `confined` first: absolute names, `..`,
backslashes and URL syntax (`%`, `?`, `#`: `images/%2e%2e/x` is `..` to an HTTP server) are
refused, so a hostile manifest cannot make a reader leave DATA_DIR. A tar-layout row's
offset and bytes are checked against the shard (and `MAX_READ_BYTES`) before anything is read.

Storage URLs are a known list (`SCHEMES`): s3, gs/gcs, az/abfs(s), and http(s) to read only;
anything else (memory://, zip://, ftp://, github://, ...) is one line, never a traceback, never
a network call, and never an --out whose data would vanish at exit.

    read_row("data", RowRef("images/ab/ab12....png"))                        # files layout
    read_row("s3://bucket/data", RowRef("images/ab/ab12....png", "shards/00003.tar", 1536, 2140))
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.errors import ConfigError, DataError

__all__ = ["RowRef", "check_scheme", "confined", "display", "exists", "filesystem", "is_url", "join", "location",
           "read_bytes", "read_row", "upload"]


# Defined here, not in imgclf.manifest (which re-exports it): reading a row must not import pandas,
# which `imgclf predict --model x.onnx one.png` and every command's start-up would pay (0.4-0.8 s).
@dataclass(frozen=True)
class RowRef:
    """Where one row's image is: the path, shard, offset and bytes columns (imgclf.storage.read_row)."""

    path: str
    shard: str = ""  # tar layout: the tar, relative to DATA_DIR ("" for a plain file)
    offset: int = -1  # tar layout: byte offset of the member's data in the tar
    size: int = 0  # the `bytes` column: the member's size (a ranged read needs it)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WRITABLE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
READ_ONLY_SCHEMES = frozenset({"http", "https"})
SCHEMES = WRITABLE_SCHEMES | READ_ONLY_SCHEMES
MAX_READ_BYTES = 64 * 1024 * 1024  # one stored image read whole from a local DATA_DIR (images.MAX_FILE_BYTES)


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` (s3, gs, memory, ...) except file://, which is a local path."""
    text = os.fspath(location)
    return bool(_SCHEME.match(text)) and not text.lower().startswith("file://")


def location(text: str | os.PathLike[str]) -> str | Path:
    """A data directory as given: an object-store URL stays text, anything else is a Path.

    Also an argparse `type=`: `Path("s3://b/p")` would collapse the `//` and lose the URL.
    """
    text = os.fspath(text)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    return text if is_url(text) else Path(text)


def display(data_dir: str | os.PathLike[str]) -> str:
    """The data directory as a user wrote it (a URL) or as an absolute local path."""
    return str(data_dir) if is_url(data_dir) else str(Path(data_dir).resolve())


def confined(rel: str) -> str:
    """`rel` if it is a plain relative name inside DATA_DIR; DataError otherwise.

    Manifests are data: a row may come from another tool or another person. Absolute names,
    `..` components, backslashes and NULs could make a reader open files outside DATA_DIR.
    """
    # %, ? and #: on object storage or HTTP a name is a URL path (%2e%2e is ..; ? and # cut it).
    # imgclf never writes such names (images/<sha>.<ext>, shards/<n>.tar).
    if (not rel or "\\" in rel or "\x00" in rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel)
            or any(ch in rel for ch in "%?#")):
        raise DataError(f"manifest names {rel!r}: not a relative path inside the data directory")
    if any(part in ("..", "") for part in rel.split("/")) or posixpath.normpath(rel) != rel:
        raise DataError(f"manifest names {rel!r}: not a plain relative path inside the data directory")
    return rel


def join(base: str | os.PathLike[str], rel: str) -> str:
    """`base/rel` for a local folder or a URL (rel is confined first)."""
    rel = confined(rel)
    if is_url(base):
        return os.fspath(base).rstrip("/") + "/" + rel
    return os.path.join(os.fspath(base), rel)


def check_scheme(url: str, write: bool = False) -> None:
    """ConfigError unless `url`'s storage is one imgclf supports (for writing: not http(s))."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in WRITABLE_SCHEMES or (not write and scheme in READ_ONLY_SCHEMES):
        return
    if scheme in READ_ONLY_SCHEMES:
        raise ConfigError(f"{url[:200]}: http(s) storage is read-only; write to a local folder or to "
                          "s3://, gs://, az://")
    raise ConfigError(f"{url[:200]}: storage scheme {scheme[:40]!r} is not supported (use a local path, "
                      "s3://, gs://, az://, or http(s):// to read)")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; one line naming the missing package."""
    check_scheme(url)
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with lightning
        raise ConfigError(f"{url}: object storage needs fsspec (pip install 'imgclf[s3]')") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise ConfigError(f"{url}: needs the package for this storage ({err}); for S3: "
                          "pip install 'imgclf[s3]'") from None
    except ValueError as err:
        raise ConfigError(f"{url}: not a storage URL fsspec knows ({err})") from None


def _open_local(base: str | os.PathLike[str], target: str) -> int:
    """A descriptor of the regular file `target` inside `base`: a symlink that leads out of `base`
    is refused (DataError), and a FIFO or a device is never read (opened non-blocking, then fstat)."""
    root, real = os.path.realpath(base), os.path.realpath(target)
    if os.path.commonpath([root, real]) != root:
        raise DataError(f"{target}: leads out of the data directory (a link to {real})")
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{target}: not a regular file")
    return fd


def _whole(fd: int, target: str, max_bytes: int) -> int:
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise OSError(f"{target}: {size} bytes, over the {max_bytes}-byte limit for one image")
    return size


def _within(fd: int, target: str, start: int, size: int) -> None:
    """A ranged read must lie inside the file (a manifest row is data: its offset may lie)."""
    total = os.fstat(fd).st_size
    if start < 0 or size < 0 or start + size > total:
        raise OSError(f"{target}: bytes {start}..{start + size} lie outside the file ({total} bytes): "
                      "shard cut or changed, or a wrong manifest row")


def read_bytes(base: str | os.PathLike[str], rel: str, start: int = 0, size: int | None = None,
               max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of `base/rel`, or `size` bytes from `start` (a ranged read). OSError when absent.

    Local reads stay inside `base` (symlinks followed, then checked), read regular files only,
    and a whole-file read is capped at `max_bytes`."""
    target = join(base, rel)
    if is_url(target):
        fs, path = filesystem(target)
        end = None if size is None else start + size
        try:
            data = fs.cat_file(path, start=start or None, end=end)
        except FileNotFoundError:
            raise
        except Exception as err:  # botocore/aiohttp raise their own types; the caller wants OSError
            raise OSError(f"{target}: {err.__class__.__name__}: {str(err)[:200]}") from None
    else:
        fd = _open_local(base, target)
        try:
            if size is not None:
                _within(fd, target, start, size)
            data = os.pread(fd, size if size is not None else _whole(fd, target, max_bytes), start)
        finally:
            os.close(fd)
    if size is not None and len(data) != size:
        raise OSError(f"{target}: short read at {start} ({len(data)} of {size} bytes): shard cut or changed")
    return data


def read_row(data_dir: str | os.PathLike[str], ref: RowRef, shard_cache: str | os.PathLike[str] | None = None) -> bytes:
    """The stored image bytes of one manifest row, from a file or from its tar shard.

    `shard_cache`: a local folder; a tar shard on object storage is then fetched whole into it,
    once, and read there (one GET per shard instead of one per image; see cached_shard)."""
    if ref.shard:
        if ref.offset < 0 or ref.size <= 0:
            raise DataError(f"manifest row {ref.path!r} in shard {ref.shard!r} lacks offset/bytes")
        if ref.size > MAX_READ_BYTES:  # 30e9 `bytes` was a MemoryError in evaluate
            raise OSError(f"{ref.shard}: manifest row {ref.path!r} claims {ref.size} bytes at offset {ref.offset}, "
                          f"over the {MAX_READ_BYTES}-byte limit for one image")
        if shard_cache is not None and is_url(data_dir):
            return read_bytes(shard_cache, cached_shard(data_dir, ref.shard, shard_cache), ref.offset, ref.size)
        return read_bytes(data_dir, ref.shard, ref.offset, ref.size)
    return read_bytes(data_dir, ref.path)


_CACHED: dict[tuple[str, str], str] = {}  # (cache folder, shard URL) -> the copy's name (per process)


def cached_shard(data_dir: str | os.PathLike[str], shard: str, cache_dir: str | os.PathLike[str]) -> str:
    """The name, inside `cache_dir`, of a local copy of a remote tar shard, fetched whole on first use.

    The copy is named by the shard's URL, size and ETag, so a shard rewritten under the same name
    (after a killed download) is fetched again; it is written to a temporary name and renamed, so
    concurrent DataLoader workers at worst fetch it twice. Nothing is ever evicted: the folder
    grows to the size of the shards a run reads (the limit of this option)."""
    url = join(data_dir, shard)
    memo = (os.fspath(cache_dir), url)
    if memo in _CACHED:
        return _CACHED[memo]
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
        key = f"{url} {info.get('size')} {info.get('ETag') or info.get('etag') or ''}"
        name = hashlib.sha256(key.encode()).hexdigest()[:32] + ".tar"
        local = Path(cache_dir) / name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(f".{name}.{uuid.uuid4().hex[:8]}.part")
            try:
                fs.get_file(path, str(part))
                os.replace(part, local)
            finally:
                part.unlink(missing_ok=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # botocore/aiohttp types, as in read_bytes
        raise OSError(f"{url}: cannot fetch the shard into {cache_dir}: {err.__class__.__name__}: "
                      f"{str(err)[:200]}") from None
    _CACHED[memo] = name
    return name


def exists(base: str | os.PathLike[str], rel: str) -> bool:
    """Whether base/rel is there; False also when object storage cannot be asked (a reader then
    says why in one line)."""
    target = join(base, rel)
    if is_url(target):
        fs, path = filesystem(target)
        try:
            return bool(fs.exists(path))
        except Exception:  # endpoint down, denied: botocore/aiohttp types
            return False
    return os.path.isfile(target)


def upload(local: str | os.PathLike[str], base: str, rel: str) -> None:
    """Copy a finished local file to `base/rel` on object storage.

    One PUT (or a multipart upload completed at the end): the object appears whole or not at
    all, which is the object-store form of write-to-temp-then-rename.
    """
    check_scheme(os.fspath(base), write=True)
    fs, path = filesystem(join(base, rel))
    fs.put_file(os.fspath(local), path)

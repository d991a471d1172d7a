"""CPU side of the download: validate one body, resize/re-encode it, store it by content hash.

Runs in worker processes (`process_body` is the pickled entry point); results are values.
Files land in DATA_DIR/images/<sha[:2]>/<sha>.<ext> via a temporary file in DATA_DIR/.tmp and an
atomic rename, so a kill at any moment leaves either the whole file or no file in images/.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from imgclf import storage
from imgclf._files import write_all
from imgclf.download._local import LocalRef
from imgclf.download._options import StoreSettings
from imgclf.download._read import read_local
from imgclf.images import Decoded, Rejected, decode_image

TMP_DIR = ".tmp"
IMAGES_DIR = "images"
# Formats we may store as they came; anything else (GIF, BMP, TIFF, ...) is re-encoded.
_KEEPABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PIL_NAME = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True)
class Stored:
    sha256: str
    path: str  # relative to DATA_DIR
    width: int
    height: int
    bytes: int
    # --layout tar: the encoded image, for the parent's shard writer (nothing was written here)
    data: bytes | None = field(default=None, repr=False, compare=False)


def target_size(width: int, height: int, settings: StoreSettings) -> tuple[int, int]:
    """Shrink (never enlarge) so the chosen side is at most settings.size, keeping the aspect ratio."""
    if settings.resize == "none":
        return width, height
    side = min(width, height) if settings.resize == "shorter" else max(width, height)
    if side <= settings.size:
        return width, height
    scale = settings.size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _can_keep_bytes(decoded: Decoded, size: tuple[int, int], settings: StoreSettings) -> bool:
    # The original file is stored only when re-reading it gives exactly the validated pixels.
    return (settings.image_format == "keep" and decoded.source_format in _KEEPABLE
            and size == decoded.image.size and decoded.source_mode in ("RGB", "L")
            and not decoded.rotated and decoded.frames == 1
            and decoded.scale == 1)  # a JPEG decoded at reduced size: its bytes hold the full-size image


def _encode(image: Image.Image, source_format: str, settings: StoreSettings) -> tuple[bytes, str]:
    if settings.image_format == "keep":
        fmt = source_format if source_format in _KEEPABLE else "PNG"
    else:
        fmt = _PIL_NAME[settings.image_format]
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=settings.quality)
    elif fmt == "WEBP":
        image.save(buf, "WEBP", quality=settings.quality, method=4)
    else:
        image.save(buf, "PNG", compress_level=6)
    return buf.getvalue(), _KEEPABLE[fmt]


def write_once(data_dir: Path, rel: str, data: bytes) -> None:
    """Write `data` at data_dir/rel (temporary file + rename) unless it is there already (named by its hash).

    Plain os calls, one mkdir per folder per process: for small images the file system calls
    are most of a worker's time (pathlib, is_file + stat, two mkdirs per file were 2/3 of it).
    """
    final = os.path.join(data_dir, rel)
    try:
        if os.stat(final).st_size == len(data):
            return  # content-addressed: same name and size means same bytes
    except OSError:
        pass
    tmp_dir = os.path.join(data_dir, TMP_DIR)
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.part")
    try:
        _write_new(tmp, final, data)
    except FileNotFoundError:  # a folder not made yet by this process (or removed since): make, retry
        for folder in (os.path.dirname(final), tmp_dir):
            os.makedirs(folder, exist_ok=True)
        _write_new(tmp, final, data)


def write_file(out: str, rel: str, data: bytes) -> None:
    """Store one image at out/rel: a local folder (write_once) or an object-store URL (one PUT,
    so the object appears whole or not at all)."""
    if not storage.is_url(out):
        write_once(Path(out), rel, data)
        return
    fs, path = storage.filesystem(storage.join(out, rel))
    try:
        fs.pipe_file(path, data)
    except OSError:
        raise
    except Exception as err:  # botocore/aiohttp errors: a row-level storage_error like a full disk
        raise OSError(f"{err.__class__.__name__}: {str(err)[:200]}") from None


def _write_new(tmp: str, final: str, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit when the downloader dies, even by SIGKILL (no orphan workers).

    Forked workers share the pool's pipes with their siblings, so they never see EOF when the
    parent is killed; without this they would wait for work for ever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # portable fallback
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def process_body(body: bytes, settings: StoreSettings) -> Stored | Rejected:
    """Decode, validate, resize, encode, hash and store one body; never raises for bad content."""
    decoded = decode_image(body, settings.limits)
    if isinstance(decoded, Rejected):
        return decoded
    image = decoded.image
    size = target_size(*image.size, settings)
    if _can_keep_bytes(decoded, size, settings):
        data, ext = body, _KEEPABLE[decoded.source_format]
    else:
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        data, ext = _encode(image, decoded.source_format, settings)
    sha = hashlib.sha256(data).hexdigest()
    rel = f"{IMAGES_DIR}/{sha[:2]}/{sha}.{ext}"
    if settings.layout == "tar":  # the parent appends it to its current shard (see _writers)
        return Stored(sha, rel, size[0], size[1], len(data), data)
    try:
        write_file(settings.data_dir, rel, data)
    except OSError as err:  # disk full, permissions: a row-level failure, the run goes on
        return Rejected("storage_error", f"cannot write {rel}: {err.strerror or err}")
    return Stored(sha, rel, size[0], size[1], len(data))


def process_local(ref: LocalRef, settings: StoreSettings) -> Stored | Rejected:
    """A local file or archive member: the worker reads it itself (no bytes through the pool's pipe),
    then validates and stores it exactly like a downloaded body."""
    body = read_local(ref, settings.max_bytes)
    return body if isinstance(body, Rejected) else process_body(body, settings)


def process_many(items: list[bytes | LocalRef], settings: StoreSettings) -> list[Stored | Rejected]:
    """One pool task for several bodies or local refs (see _batch): same results as one by one."""
    return [process_body(item, settings) if isinstance(item, bytes) else process_local(item, settings)
            for item in items]

"""Decode and validate image bytes with Pillow: the one place that decides "is this an image",
and how much work one image may cost.

Used by download (to validate and store), predict, serve, evaluate, train's decoder and the
report's thumbnails. Validation never trusts Content-Type or extensions: a body is an image
when Pillow decodes it fully. Results are values (`Decoded` or `Rejected`), not exceptions, so
the downloader's hot loop never stops on one bad body.

Work per image is bounded before a single pixel is decoded, from the header alone
(`check_size`): the decoded pixel count, each side, and, when the caller resizes afterwards
(`ImageLimits.resize_to`, the eval preprocessing's shorter side), the pixels that resize will
allocate: a valid 467-byte PNG of 1 x 200,000 pixels passes a pixel-count check but would be
upscaled to 73 x 14,600,000. Formats are an allow-list of raster formats, animations are never
counted frame by frame, progressive JPEGs have a scan budget and PNG text chunks a memory cap,
and local files are read only when they are regular files, up to a size cap (`read_file`).

Large legitimate images (posters, scans: 10,000 x 16,000 px) are over the pixel limit. A
baseline JPEG is then decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow's
`draft`), the smallest reduction whose decoded size fits the limits, or further when the caller
shrinks it afterwards anyway (`shrinks_to`, `resize_to`): memory stays bounded by `max_pixels`,
as for any other image, and the pixels are never allocated at full size. Every
other format (PNG, WebP, TIFF, progressive JPEG, whose decoder holds every coefficient of the
full image) has no such path and stays refused, with the reason (`too_large_kind` names it).
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from imgclf.errors import first_line

# Pillow raises DecompressionBombError only above 2x this; we check the pixel count ourselves.
Image.MAX_IMAGE_PIXELS = None
# zTXt/iTXt/iCCP chunks: each is already capped at 1 MiB decompressed; all of one image at 4 MiB
# (Pillow's default, 64 MiB, is more than the image itself may use).
PngImagePlugin.MAX_TEXT_MEMORY = 4 * PngImagePlugin.MAX_TEXT_CHUNK
# Pillow warns about things we already handle (corrupt EXIF, palette transparency, bombs).
# One process-wide filter, set at import: warnings.catch_warnings() is not thread-safe and
# decode_image runs in predict's and serve's thread pools.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

# Raster formats we decode (MPO, phones' multi-picture JPEG, opens as JPEG). Not EPS (Pillow runs
# Ghostscript on it), nor the scientific and identify-only ones; any other body is "not a format
# Pillow reads".
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "ICO", "CUR", "PPM", "TGA", "PCX", "PSD", "QOI",
           "SGI", "AVIF", "JPEG2000")
MAX_FILE_BYTES = 64 * 1024 * 1024  # local files (predict, stored images): read at most this much


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost. Checked from the header, before decoding (see `check_size`)."""

    max_pixels: int = 64_000_000  # decoded width x height
    min_side: int = 8
    max_side: int = 65_535  # decoded width or height (JPEG's own maximum)
    # Pixels the resize after decoding may allocate (uint8 RGB: 48 MB at 16M pixels).
    max_resized_pixels: int = 16_000_000
    # Shorter side of the resize that follows decoding (eval preprocessing's resize_size); None
    # when the caller never enlarges (download and the decode cache only shrink).
    resize_to: int | None = None
    # Progressive JPEG scans: each one is a pass over every pixel (libjpeg has no limit of its own).
    max_jpeg_scans: int = 100
    # A JPEG over the pixel limit is decoded at reduced scale (see jpeg_scale): the caller's own
    # later shrink, (which side, its size), lets libjpeg reduce as far as that still allows
    # (download's 512 px longer side: a 10,000 x 16,000 poster at 1/8). None: the least reduction.
    shrinks_to: tuple[Literal["shorter", "longer"], int] | None = None

    def for_resize(self, short_side: int) -> ImageLimits:
        """These limits for a caller that resizes the shorter side to `short_side` after decoding."""
        return replace(self, resize_to=int(short_side))


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, orientation applied, first frame only
    source_format: str
    # How the bytes differ from `image`: lets the downloader keep original bytes when nothing changed.
    source_mode: str = ""
    rotated: bool = False  # an EXIF orientation other than 1 was applied
    # 1 for a still image, 2 for "more than one": frames are never counted (a GIF's count costs a
    # pass over the whole file, and a hostile one holds hundreds of thousands).
    frames: int = 1
    # 2, 4 or 8: a JPEG over the pixel limit, decoded at 1/scale by DCT scaling (its bytes are
    # then never the stored image as they are).
    scale: int = 1


@dataclass(frozen=True)
class Rejected:
    status: str  # a manifest status: not_image, too_small, too_large, empty, unreadable
    reason: str


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """The size torchvision's `Resize(short_side)` gives: shorter side = short_side, ratio kept."""
    if width <= height:
        return short_side, int(short_side * height / max(width, 1))
    return int(short_side * width / max(height, 1)), short_side


def check_resize(width: int, height: int, short_side: int, limits: ImageLimits = ImageLimits()) -> Rejected | None:
    """too_large when resizing (width, height) to `short_side` would allocate over the limit."""
    out_w, out_h = resized_size(width, height, short_side)
    if out_w * out_h > limits.max_resized_pixels:
        ratio = max(width, height) / max(min(width, height), 1)
        return Rejected("too_large", f"{width}x{height} (aspect ratio {ratio:.0f}:1) would be resized to "
                                     f"{out_w}x{out_h}, over the {limits.max_resized_pixels}-pixel limit")
    return None


def check_size(width: int, height: int, limits: ImageLimits = ImageLimits()) -> Rejected | None:
    """The one bound on the work per image, from its header size alone (nothing decoded yet)."""
    if width * height > limits.max_pixels:
        return Rejected("too_large", f"{width}x{height} exceeds {limits.max_pixels} pixels")
    if max(width, height) > limits.max_side:
        return Rejected("too_large", f"{width}x{height} has a side over {limits.max_side} pixels")
    if limits.resize_to is not None:
        return check_resize(width, height, limits.resize_to, limits)
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any mode to RGB; transparency is composited on white, as a viewer shows it."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        img = img.point(lambda v: v * (255.0 / 65535.0)).convert("L")
    elif img.mode == "F":
        # Float images (TIFF): values in [0, 1] are the common convention; clip the rest.
        img = img.point(lambda v: v * 255.0).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _jpeg_scans(data: bytes) -> int:
    # SOS markers (0xFFDA): entropy-coded data stuffs every 0xFF as 0xFF00, so each is a real
    # scan (of the image or of an embedded thumbnail): an upper bound, counted without decoding.
    return data.count(b"\xff\xda")


def _over_pixels(width: int, height: int, limits: ImageLimits) -> bool:
    return width * height > limits.max_pixels or max(width, height) > limits.max_side


def jpeg_scale(width: int, height: int, progressive: bool, limits: ImageLimits) -> int | Rejected:
    """1 when a JPEG fits the limits; else the DCT scale (2, 4, 8) that makes it fit, or why none can.

    libjpeg decodes a baseline JPEG at 1/2, 1/4 or 1/8 of its size without allocating the full
    image. A progressive one buffers the coefficients of the whole image (2 bytes per sample)
    before the first output row, whatever the scale: refused like any other oversized image.
    """
    if not _over_pixels(width, height, limits):
        return 1
    if progressive:
        return Rejected("too_large", f"{width}x{height} exceeds {limits.max_pixels} pixels, and a progressive "
                                     "JPEG cannot be decoded at reduced size in bounded memory")
    for scale in (2, 4, 8):
        if not _over_pixels(-(-width // scale), -(-height // scale), limits):
            return _further(width, height, scale, limits)
    return Rejected("too_large", f"{width}x{height} exceeds {limits.max_pixels} pixels even decoded at 1/8 scale")


def _further(width: int, height: int, scale: int, limits: ImageLimits) -> int:
    """The largest DCT scale from `scale` up that keeps the side the caller shrinks to (less to decode)."""
    # A caller that resizes the shorter side afterwards (predict, serve: the eval resize) says so in resize_to.
    need = limits.shrinks_to or (("shorter", limits.resize_to) if limits.resize_to else None)
    if need is None:
        return scale
    which, size = need
    pick = min if which == "shorter" else max
    while scale < 8 and pick(width // (scale * 2), height // (scale * 2)) >= size:
        scale *= 2
    return scale


def _reduction(img: Image.Image, limits: ImageLimits) -> int | Rejected:
    """The scale this image will be decoded at: 1, or a JPEG's DCT scale; other formats are never reduced."""
    if img.format not in ("JPEG", "MPO"):
        if _over_pixels(*img.size, limits):
            refused = check_size(*img.size, limits)
            assert refused is not None
            return Rejected("too_large", f"{refused.reason}; only a baseline JPEG can be decoded at reduced "
                                         f"size (this is {img.format})")
        return 1
    return jpeg_scale(*img.size, bool(img.info.get("progressive")), limits)


def _precheck(img: Image.Image, data: bytes, limits: ImageLimits) -> int | Rejected:
    scale = _reduction(img, limits)
    if isinstance(scale, Rejected):
        return scale
    too_big = check_size(-(-img.size[0] // scale), -(-img.size[1] // scale), limits)
    if too_big is not None:
        return too_big
    scans = _jpeg_scans(data) if img.format in ("JPEG", "MPO") else 0
    if scans > limits.max_jpeg_scans:
        return Rejected("too_large", f"a JPEG of {scans} scans, more than {limits.max_jpeg_scans} "
                                     "(each one is a pass over every pixel)")
    return scale


def _draft(img: Image.Image, scale: int) -> None:
    """Ask libjpeg for 1/scale decoding (Pillow picks the largest DCT scale the request allows)."""
    if scale > 1:
        img.draft(None, (img.size[0] // scale, img.size[1] // scale))


def _text_or_binary(head: bytes) -> str:
    for cut in range(4):  # a multi-byte character cut at 200 bytes still reads as text
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            text = ""
    return "text" if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text) else "binary"


def _describe_failure(data: bytes, err: Exception) -> str:
    head = data[:200].lstrip().lower()
    kind = "html" if head.startswith((b"<!doctype html", b"<html")) else ("svg" if b"<svg" in head else "")
    if kind:
        return f"{kind} document"
    if isinstance(err, UnidentifiedImageError):  # its text only names our in-memory buffer
        # What kind of bytes, never the bytes: a file's contents (b'root:x:0') must not reach a manifest.
        return f"not a format Pillow reads ({_text_or_binary(head)}, {len(data)} bytes)"
    message = str(err)[:120]
    # A decoder may quote the file (PPM: "Token too long in file header: b'...'"): never its bytes.
    message = re.sub(r"""b['"].*""", "(quoted bytes not shown)", message)
    return f"{err.__class__.__name__}: {message}"


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), *, keep_grey: bool = False) -> Decoded | Rejected:
    """Decode `data` fully; return an RGB image or the reason it is not a usable image.

    `keep_grey`: an 8-bit greyscale image stays mode "L" instead of becoming RGB. For callers that
    resize with Pillow and repeat the channel afterwards (inference's `PillowResize`): Pillow resizes
    each channel alike, so that is bitwise the RGB result at a third of the work.
    """
    if not data:
        return Rejected("empty", "empty body")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        fmt = img.format or "unknown"
        scale = _precheck(img, data, limits)
        if isinstance(scale, Rejected):
            return scale
        frames = 2 if getattr(img, "is_animated", False) else 1
        img.seek(0)  # animated images: first frame
        _draft(img, scale)  # after seek: an MPO's seek(0) sets the tile anew
        # A GIF frame may enlarge the canvas; a draft that did not reduce enough is caught here too.
        refused = check_size(*img.size, limits)
        if refused is not None:
            return refused
        img.load()
        mode = img.mode
        rotated = img.getexif().get(0x0112, 1) not in (0, 1)
        if rotated:  # exif_transpose copies even an upright image: twice the memory of a large one
            img = ImageOps.exif_transpose(img) or img
        if not (keep_grey and img.mode == "L"):
            img = _to_rgb(img)
    except Image.DecompressionBombError as err:
        return Rejected("too_large", first_line(err, with_type=False))
    except MemoryError:
        return Rejected("too_large", "decoding it ran out of memory")
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "not an image"
        return Rejected("not_image", _describe_failure(data, err))
    if min(img.size) < limits.min_side:
        return Rejected("too_small",
                        f"{img.size[0]}x{img.size[1]} is under the {limits.min_side}px minimum side")
    return Decoded(img, fmt, source_mode=mode, rotated=rotated, frames=frames, scale=scale)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> bytes | Rejected:
    """The bytes of a regular file, at most `max_bytes`; a Rejected ("unreadable", "too_large") else.

    Checked with stat before the open, then opened with O_NONBLOCK and checked again with fstat
    (the file may change in between): a FIFO neither blocks the open nor the read, and a device
    (/dev/zero), a socket or a directory is never read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        kind = os.stat(path).st_mode  # a socket cannot even be opened: say what it is
        if not stat.S_ISREG(kind):
            return Rejected("unreadable", f"{_kind(kind)}, not a regular file")
        fd = os.open(path, flags)
    except OSError as err:
        return Rejected("unreadable", err.strerror or err.__class__.__name__)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Rejected("unreadable", f"{_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            return Rejected("too_large", f"file of {info.st_size} bytes exceeds {max_bytes} bytes")
        chunks, size = [], 0
        while size <= max_bytes:  # a file that grows while we read stops at the cap too
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            return Rejected("too_large", f"file exceeds {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as err:
        return Rejected("unreadable", err.strerror or err.__class__.__name__)
    finally:
        os.close(fd)


def open_image_file(path: str | os.PathLike[str], limits: ImageLimits = ImageLimits(min_side=1),
                    max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """Read a local image file as RGB; raise ValueError with the reason when it is not one."""
    data = read_file(path, max_bytes)
    result = data if isinstance(data, Rejected) else decode_image(data, limits)
    if isinstance(result, Rejected):
        raise ValueError(f"{Path(path)}: {result.status}: {result.reason}")
    return result.image


# Why an image was too_large, from its reason (the manifest's `error`): download's summary counts
# each kind. First match wins; the phrases are the ones this module and the fetchers write.
_TOO_LARGE_KINDS = (
    ("progressive JPEG", "progressive JPEG over the pixel limit (no reduced-size decoding)"),
    ("only a baseline JPEG", "over the pixel limit, in a format with no reduced-size decoding"),
    ("even decoded at 1/8", "over the pixel limit even at 1/8 scale"),
    ("would be resized to", "extreme aspect ratio (its resize would be over the limit)"),
    ("scans", "progressive JPEG with too many scans"),
    ("bytes", "file or body over the byte limit (--max-bytes)"),
    ("pixels", "over the pixel limit"),
)


def too_large_kind(reason: str) -> str:
    """A short, countable cause for a too_large reason (download's summary groups by it)."""
    return next((kind for phrase, kind in _TOO_LARGE_KINDS if phrase in reason), "other")

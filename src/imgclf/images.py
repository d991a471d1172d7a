"""Decode and validate image bytes with Pillow: the one place that decides "is this an image".

Used by download (to validate and store), predict and serve (to read user input).
Validation never trusts Content-Type or extensions: a body is an image when Pillow
decodes it fully. Results are values (`Decoded` or `Rejected`), not exceptions, so the
downloader's hot loop never stops on one bad body.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow raises DecompressionBombError only above 2x this; we check the pixel count ourselves.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns about things we already handle (corrupt EXIF, palette transparency, bombs).
# One process-wide filter, set at import: warnings.catch_warnings() is not thread-safe and
# decode_image runs in predict's and serve's thread pools.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 64_000_000
    min_side: int = 8


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, orientation applied, first frame only
    source_format: str
    # How the bytes differ from `image`: lets the downloader keep original bytes when nothing changed.
    source_mode: str = ""
    rotated: bool = False  # an EXIF orientation other than 1 was applied
    frames: int = 1


@dataclass(frozen=True)
class Rejected:
    status: str  # a manifest status: not_image, too_small, too_large, empty
    reason: str


def _to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any mode to RGB; transparency is composited on white, as a viewer shows it."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        img = img.point(lambda v: v * (255.0 / 65535.0)).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Decoded | Rejected:
    """Decode `data` fully; return an RGB image or the reason it is not a usable image."""
    if not data:
        return Rejected("empty", "empty body")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or "unknown"
        width, height = img.size
        if width * height > limits.max_pixels:
            return Rejected("too_large", f"{width}x{height} exceeds {limits.max_pixels} pixels")
        frames = int(getattr(img, "n_frames", 1) or 1)
        img.seek(0)  # animated images: first frame
        img.load()
        mode = img.mode
        rotated = img.getexif().get(0x0112, 1) not in (0, 1)
        img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img)
    except Image.DecompressionBombError as err:
        return Rejected("too_large", str(err).splitlines()[0])
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "not an image"
        head = data[:200].lstrip().lower()
        kind = "html" if head.startswith((b"<!doctype html", b"<html")) else (
            "svg" if b"<svg" in head else "")
        if kind:
            detail = f"{kind} document"
        elif isinstance(err, UnidentifiedImageError):  # its text only names our in-memory buffer
            detail = f"not a format Pillow reads (starts with {data[:8]!r})"
        else:
            detail = f"{err.__class__.__name__}: {str(err)[:120]}"
        return Rejected("not_image", detail)
    if min(img.size) < limits.min_side:
        return Rejected("too_small",
                        f"{img.size[0]}x{img.size[1]} is under the {limits.min_side}px minimum side")
    return Decoded(img, fmt, source_mode=mode, rotated=rotated, frames=frames)


def open_image_file(path: str, limits: ImageLimits = ImageLimits(min_side=1)) -> Image.Image:
    """Read a local image file as RGB; raise ValueError with the reason when it is not one."""
    with open(path, "rb") as fh:
        result = decode_image(fh.read(), limits)
    if isinstance(result, Rejected):
        raise ValueError(f"{path}: {result.status}: {result.reason}")
    return result.image

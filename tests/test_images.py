"""images.decode_image on real encoded bodies (built with Pillow's own encoders)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fault_server import sample_images

from imgclf.images import Decoded, ImageLimits, Rejected, decode_image, open_image_file

IMAGES = sample_images()


@pytest.mark.parametrize("name, status", [
    ("truncated.jpg", "not_image"), ("page.html", "not_image"), ("drawing.svg", "not_image"),
    ("notes.txt", "not_image"), ("empty.jpg", "empty"), ("tiny.png", "too_small"), ("bomb.png", "too_large"),
])
def test_rejections(name: str, status: str) -> None:
    result = decode_image(IMAGES[name])
    assert isinstance(result, Rejected) and result.status == status and result.reason
    assert "object at 0x" not in result.reason  # says what the body is, not where Pillow read it


def test_an_unknown_format_is_described_never_quoted() -> None:
    """What kind of bytes, never the bytes (a local /etc/passwd must not reach the manifest: issue 22)."""
    result = decode_image(b"RIFX\x00\x01junk that is no image")
    assert isinstance(result, Rejected) and result.status == "not_image"
    assert result.reason == "not a format Pillow reads (binary, 27 bytes)"
    text = decode_image(b"root:x:0:0:root:/root:/bin/bash\n")
    assert text.reason == "not a format Pillow reads (text, 32 bytes)" and "root" not in text.reason


@pytest.mark.parametrize("name, mode", [
    ("rgb.jpg", "RGB"), ("cmyk.jpg", "CMYK"), ("deep16.png", "I;16"), ("palette_alpha.png", "P"),
    ("animated.gif", "P"), ("image.webp", "RGB"),
])
def test_every_mode_becomes_rgb(name: str, mode: str) -> None:
    result = decode_image(IMAGES[name])
    assert isinstance(result, Decoded) and result.image.mode == "RGB" and result.source_mode == mode


def test_exif_orientation_is_applied() -> None:
    result = decode_image(IMAGES["rotated.jpg"])
    assert isinstance(result, Decoded) and result.rotated and result.image.size == (48, 64)
    plain = decode_image(IMAGES["rgb.jpg"])
    assert isinstance(plain, Decoded) and not plain.rotated and plain.image.size == (64, 48)


def test_animated_keeps_first_frame() -> None:
    result = decode_image(IMAGES["animated.gif"])
    assert isinstance(result, Decoded) and result.frames > 1  # animated (frames are not counted)
    assert result.image.getpixel((3, 3)) == (255, 0, 0)


def test_limits_are_configurable() -> None:
    assert isinstance(decode_image(IMAGES["rgb.jpg"], ImageLimits(max_pixels=1000)), Rejected)
    assert isinstance(decode_image(IMAGES["tiny.png"], ImageLimits(min_side=1)), Decoded)


def test_open_image_file_raises_with_the_reason(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "x.jpg"
    bad.write_bytes(IMAGES["page.html"])
    with pytest.raises(ValueError, match="not_image"):
        open_image_file(str(bad))
    good = tmp_path / "y.png"
    good.write_bytes(IMAGES["tiny.png"])
    assert open_image_file(str(good)).size == (1, 1)


def test_pillow_warnings_are_silenced_process_wide_not_per_call() -> None:
    # decode_image runs in thread pools, so it must not use warnings.catch_warnings(); the filter
    # is set once at import. A fresh interpreter, because pytest discards filters set while collecting.
    code = (
        "import warnings, imgclf.images\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.warn_explicit('Corrupt EXIF data', UserWarning, 'x.py', 1, module='PIL.TiffImagePlugin')\n"
        "    warnings.warn_explicit('not Pillow', UserWarning, 'y.py', 1, module='PILlow_fake')\n"
        "print([str(w.message) for w in caught])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['not Pillow']"

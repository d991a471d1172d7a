"""images.decode_image on real encoded bodies (built with Pillow's own encoders)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fault_server import sample_images
from PIL import Image
from rich.console import Console

from imgclf.images import Decoded, ImageLimits, Rejected, decode_image, open_image_file, too_large_kind

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
    assert isinstance(decode_image(IMAGES["other.png"], ImageLimits(max_pixels=1000)), Rejected)
    assert isinstance(decode_image(IMAGES["tiny.png"], ImageLimits(min_side=1)), Decoded)


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_scale_other_formats_are_refused() -> None:
    # 64 x 48 = 3072 pixels against a 1000-pixel limit: libjpeg decodes it at 1/2 (32 x 24).
    half = decode_image(IMAGES["rgb.jpg"], ImageLimits(max_pixels=1000))
    assert isinstance(half, Decoded) and half.scale == 2 and half.image.size == (32, 24)
    # the same picture, smaller: left half red, right half blue
    assert half.image.getpixel((8, 12)) == pytest.approx((200, 30, 30), abs=3)
    assert half.image.getpixel((24, 12)) == pytest.approx((30, 30, 200), abs=3)
    eighth = decode_image(IMAGES["rgb.jpg"], ImageLimits(max_pixels=48, min_side=1))
    assert isinstance(eighth, Decoded) and eighth.scale == 8 and eighth.image.size == (8, 6)
    # A caller that resizes the shorter side to 12 afterwards: 1/4 still leaves 12 rows.
    quarter = decode_image(IMAGES["rgb.jpg"], ImageLimits(max_pixels=1000, min_side=1).for_resize(12))
    assert isinstance(quarter, Decoded) and quarter.scale == 4 and quarter.image.size == (16, 12)
    full = decode_image(IMAGES["rgb.jpg"])
    assert isinstance(full, Decoded) and full.scale == 1 and full.image.size == (64, 48)

    refused = decode_image(IMAGES["rgb.jpg"], ImageLimits(max_pixels=40, min_side=1))
    assert isinstance(refused, Rejected) and refused.status == "too_large"
    assert too_large_kind(refused.reason) == "over the pixel limit even at 1/8 scale"
    png = decode_image(IMAGES["other.png"], ImageLimits(max_pixels=1000))  # no reduced decoding for PNG
    assert isinstance(png, Rejected) and "only a baseline JPEG" in png.reason and "PNG" in png.reason
    assert too_large_kind(png.reason) == "over the pixel limit, in a format with no reduced-size decoding"
    progressive = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(progressive, "JPEG", progressive=True)
    prog = decode_image(progressive.getvalue(), ImageLimits(max_pixels=1000))
    assert isinstance(prog, Rejected) and too_large_kind(prog.reason).startswith("progressive JPEG over")


# A 10,000 x 16,000 poster (160 M pixels, 2.5x the 64 M limit), decoded in a child whose address
# space is capped at 450 MiB: the full image alone (480 MB RGB) cannot even be allocated there.
_POSTER_CHILD = """
import resource, sys
from PIL import Image
from imgclf.images import Decoded, ImageLimits, decode_image
cap = 450 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
data = open(sys.argv[1], "rb").read()
shrink = int(sys.argv[2])  # the caller's later shrink of the longer side (0: none)
result = decode_image(data, ImageLimits(shrinks_to=("longer", shrink) if shrink else None))
assert isinstance(result, Decoded), result
centre = result.image.getpixel((result.image.width // 2, result.image.height // 2))
print("decoded", result.scale, result.image.width, result.image.height, *centre)
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of pytest starts at pytest's own peak.
print("peak_kib", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
del result
try:
    Image.open(sys.argv[1]).load()
    print("full", "loaded")
except MemoryError:
    print("full", "MemoryError")
"""

_MAKE_POSTER = """
import sys
from PIL import Image
w, h = 10_000, 16_000
r = Image.linear_gradient("L").resize((w, h))
g = r.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
b = Image.radial_gradient("L").resize((w, h))
Image.merge("RGB", (r, g, b)).save(sys.argv[1], "JPEG", quality=85)
Image.new("1", (w, h), 1).save(sys.argv[2], "PNG")  # the same size as PNG: nothing reduces it
"""


@pytest.fixture(scope="module")
def posters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """poster.jpg and poster.png, 10,000 x 16,000, written by a child (its 1 GB of pixels leaves with it)."""
    folder = tmp_path_factory.mktemp("posters")
    jpg, png = folder / "poster.jpg", folder / "poster.png"
    subprocess.run([sys.executable, "-c", _MAKE_POSTER, str(jpg), str(png)], check=True, timeout=300)
    return jpg, png


def _decode_poster(jpg: Path, shrink: int) -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", _POSTER_CHILD, str(jpg), str(shrink)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}


def test_a_10000_by_16000_jpeg_decodes_in_bounded_memory(posters: tuple[Path, Path]) -> None:
    jpg, _ = posters
    assert jpg.stat().st_size < 20_000_000  # under download's default --max-bytes
    fields = _decode_poster(jpg, 0)
    scale, width, height, *centre = (int(v) for v in fields["decoded"])
    assert (scale, width, height) == (2, 5000, 8000)  # 40 M pixels: the smallest reduction under 64 M
    assert centre[2] < 40  # the radial gradient is dark at the centre: the real picture, not noise
    assert fields["full"] == ["MemoryError"]  # the same child could not hold the poster at full size
    print("poster", jpg.stat().st_size, "bytes; peak RSS of the decode", fields["peak_kib"][0], "KiB")
    assert int(fields["peak_kib"][0]) < 200 * 1024  # 120 MB of pixels, plus the file and Python

    # A caller that shrinks to 512 px anyway (download's default) lets libjpeg go to 1/8.
    small = _decode_poster(jpg, 512)
    assert [int(v) for v in small["decoded"][:3]] == [8, 1250, 2000]
    print("with shrinks_to=('longer', 512): peak RSS", small["peak_kib"][0], "KiB")
    assert int(small["peak_kib"][0]) < 60 * 1024  # 7.5 MB of pixels, not 120 MB


def test_download_stores_the_poster_and_counts_refusals_by_cause(posters: tuple[Path, Path], tmp_path: Path) -> None:
    import imgclf
    from imgclf.download._report import print_summary

    jpg, png = posters
    folder = tmp_path / "scans" / "train" / "poster"
    folder.mkdir(parents=True)
    for src in (jpg, png):
        (folder / src.name).symlink_to(src)
    result = imgclf.download(tmp_path / "scans", tmp_path / "data", progress=False, follow_links=True)
    manifest = pd.read_parquet(result.manifest_path)
    manifest = manifest.set_index(manifest["url"].map(lambda u: Path(u).name))
    ok = manifest.loc["poster.jpg"]
    assert ok["status"] == "ok" and (ok["width"], ok["height"]) == (320, 512)  # stored at 512 px, as any image
    refused = manifest.loc["poster.png"]
    assert refused["status"] == "too_large" and "10000x16000 exceeds 64000000 pixels" in refused["error"]
    assert result.report["too_large_kinds"] == {"over the pixel limit, in a format with no reduced-size decoding": 1}
    console = Console(record=True, width=300)
    print_summary(result.report, console)
    assert ("too_large: 1 image(s) refused: 1 over the pixel limit, in a format with no reduced-size decoding"
            in console.export_text())


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

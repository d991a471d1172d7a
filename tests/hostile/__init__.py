"""A corpus of hostile inputs, one function per kind: each writes a real file (or returns real
values) that once crashed, hung or blew up a stage of imgclf (issue 10). A new class of hostile
input is one function away; tests/test_hostile_*.py feed these to every stage that meets them.

Images are built with Pillow's own encoders where they can be, and by hand (a few struct.pack
calls) where an encoder refuses to write something that hostile: a JPEG header that claims
65,000 x 65,000 pixels, a GIF of 200,000 frames, a TIFF of 100,000 pages.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# ---------------------------------------------------------------- class 1: work per image


def _png(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **params)
    return buf.getvalue()


def extreme_aspect_png(width: int = 1, height: int = 200_000) -> bytes:
    """A valid PNG of a few hundred bytes whose eval resize (shorter side up to ~73+) would allocate
    gigabytes: 1 x 200,000 passes any pixel-count check."""
    return _png(Image.new("L", (width, height), 128), optimize=True)


def huge_header_jpeg(width: int = 65_000, height: int = 65_000) -> bytes:
    """A tiny JPEG whose frame header (SOF) claims `width` x `height` pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def many_frames_gif(frames: int = 200_000) -> bytes:
    """A 1x1 GIF of `frames` frames (~12 bytes each): counting them is a pass over every one."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor 1x1
             + b"\x02\x02\x44\x01\x00")  # LZW: min code size 2, one sub-block, terminator
    return head + loop + frame * frames + b"\x3b"


def many_pages_tiff(pages: int = 100_000) -> bytes:
    """A TIFF of `pages` 1x1 greyscale pages sharing one strip (counting pages walks every IFD)."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 16) + b"\x80" + b"\x00" * 7)  # header, strip at 8
    for page in range(pages):
        here = 16 + page * ifd_size
        following = here + ifd_size if page + 1 < pages else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", following)
    return bytes(out)


def many_scans_jpeg(scans: int = 2_000, side: int = 64) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans: libjpeg makes a
    pass over every pixel per scan, so decoding time grows with the count (a CPU bomb)."""
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    scan = data[last:-2]  # the last SOS segment and its entropy-coded data, without EOI
    have = data.count(b"\xff\xda")
    return data[:-2] + scan * max(0, scans - have) + b"\xff\xd9"


def png_text_bomb(chunks: int = 200, each: int = 1_000_000) -> bytes:
    """A 16x16 PNG with `chunks` zTXt chunks of `each` bytes decompressed (~1 KB each on disk)."""
    data = _png(Image.new("RGB", (16, 16), (1, 2, 3)))
    text = b"bomb\x00\x00" + zlib.compress(b"A" * each, 9)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk * chunks + data[end:]


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of a real image file: the header reads, the pixels do not."""
    return data[: max(1, int(len(data) * keep))]


def decode_mode_images() -> dict[str, bytes]:
    """One small image per awkward mode: 16-bit, 32-bit int, float, CMYK, LAB, 1-bit, LA, RGBa."""
    import numpy as np

    def enc(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt)
        return buf.getvalue()

    ramp = np.arange(40 * 30).reshape(30, 40)
    return {
        "i16.png": enc(Image.fromarray((ramp * 50).astype(">u2")), "PNG"),
        "i32.tif": enc(Image.fromarray((ramp * 1000).astype(np.int32)), "TIFF"),
        "float.tif": enc(Image.fromarray((ramp / ramp.max()).astype(np.float32)), "TIFF"),
        "cmyk.jpg": enc(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG"),
        "lab.tif": enc(Image.new("LAB", (20, 20), (50, 20, 30)), "TIFF"),
        "bits.png": enc(Image.new("1", (20, 20), 1), "PNG"),
        "la.png": enc(Image.new("LA", (20, 20), (100, 50)), "PNG"),
    }


# ---------------------------------------------------------------- class 3: special files, loops


def fifo(path: Path) -> Path:
    """A named pipe with no writer: a plain open() for reading blocks for ever."""
    os.mkfifo(path)
    return path


def symlink_loops(root: Path, image: bytes) -> Path:
    """A folder holding an image and two links to itself (`x -> .`, `y -> .`): a `**` glob that
    follows links sees 2^depth paths."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "a.png").write_bytes(image)
    (root / "sub" / "x").symlink_to(".")
    (root / "sub" / "y").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    return root


# ---------------------------------------------------------------- class 4: labels as data

MATHTEXT_LABELS = [r"$\frac{$", "$x$", r"a$b$c$", r"$\alpha^{", r"\$5", "$$"]
CSV_INJECTION_LABELS = ["=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tTAB", "=HYPERLINK(\"http://x\")", "'quoted"]
CONTROL_LABELS = ["a\x00b", "bell\x07", "esc\x1b[31mred", "line\nbreak", "del\x7f", "c1\x85"]


# ---------------------------------------------------------------- class 5: config and CSV parsing


def yaml_alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: `width` aliases per level, `levels` levels; ends with `seed: *lN`."""
    lines = ["l0: &l0 [1]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"seed: *l{levels}")
    return "\n".join(lines) + "\n"


def yaml_override_bomb(levels: int = 8, width: int = 9) -> str:
    """The same bomb as one `key=value` override value (a flow sequence of anchors)."""
    items = ["&a0 [1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(items)}]"


def yaml_recursive_alias() -> str:
    return "seed: &a [*a]\n"


def csv_extra_field_first_row(url: str) -> str:
    """More fields than the header in the first row: pandas would take the URL as an index."""
    return f"url,label\n{url},cat,extra\n"


def csv_extra_field_later_row(url: str) -> str:
    return f"url,label\n{url},cat\n{url}?2,dog,extra\n"


def csv_duplicate_header(url: str) -> str:
    return f"url,label,URL\n{url},cat,http://other.invalid/x.png\n"


# ---------------------------------------------------------------- class 7: output encoding


def non_utf8_name(folder: Path, data: bytes, stem: bytes = b"caf\xe9") -> Path:
    """A file whose name is not valid UTF-8 (Latin-1 'café'); Python sees it with surrogate escapes."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(folder), stem + b".png")
    with open(raw, "wb") as fh:
        fh.write(data)
    return Path(os.fsdecode(raw))


# ---------------------------------------------------------------- running a stage under limits

_LIMITED = """
import atexit, resource, sys
limit = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def peak():  # the process's peak resident memory, read by the test
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB %s\\n" % line.split()[1])

atexit.register(peak)
from imgclf.cli import main
code = main(sys.argv[2:])
sys.stdout.flush()
sys.exit(code)
"""


@dataclass
class Limited:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mib: float


def run_cli(args: list[str], address_space_mib: int = 8192, timeout: float = 600,
            cwd: str | None = None) -> Limited:
    """`imgclf ARGS` in a child process under RLIMIT_AS (a bomb fails the child, not the machine),
    with its wall time and peak RSS (VmHWM, printed by the child at exit)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LIMITED, str(address_space_mib), *args], capture_output=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.monotonic() - started
    err = proc.stderr.decode("utf-8", "replace")
    peak = [int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return Limited(proc.returncode, proc.stdout.decode("utf-8", "surrogateescape"), err, seconds,
                   (peak[-1] / 1024) if peak else float("nan"))


# ---------------------------------------------------------------- metadata bombs (issue 22, class 1)


def long_url_parquet(path: Path, rows: int = 20_000, cell: int = 50_000) -> Path:
    """A small Parquet (zstd: runs of one letter compress ~1000:1) whose URL cells are `cell` bytes
    each: 20,000 x 50 KB is a gigabyte of text from a file of a few hundred KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://example.com/{i}/" + "a" * (cell - 30) for i in range(rows)]
    pq.write_table(pa.table({"url": urls, "label": ["x"] * rows}), path, compression="zstd",
                   compression_level=19, row_group_size=rows)
    return path


def long_name_targz(path: Path, members: int = 20_000, name_bytes: int = 8192) -> Path:
    """A .tar.gz of `members` empty files under class folder `a/` whose names are `name_bytes`
    long (GNU long-name headers: the names are the bulk of the stream and compress to nothing)."""
    import tarfile

    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT, compresslevel=6) as tar:
        for i in range(members):
            stem = f"a/{i}-"
            info = tarfile.TarInfo(stem + "n" * (name_bytes - len(stem) - 4) + ".png")
            tar.addfile(info, io.BytesIO(b""))
    return path

"""Test helpers shared by several test modules: real images, real data directories."""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from imgclf.manifest import write_manifest

DEMO_ROOT = Path(__file__).resolve().parents[1] / "src" / "imgclf" / "demo_data" / "fashion_mnist"
CLASSES = sorted(p.name for p in (DEMO_ROOT / "train").iterdir())


def demo_images(split: str, label: str, n: int) -> list[Path]:
    return sorted((DEMO_ROOT / split / label).glob("*.png"))[:n]


def make_data_dir(dest: Path, classes: list[str], n_train: int, n_test: int) -> Path:
    """A DATA_DIR as `download` would leave it, built from bundled images without HTTP."""
    images = dest / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for label in classes:
            for src in demo_images(split, label, n):
                data = src.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                rel = f"images/{sha[:2]}/{sha}.png"
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / rel)
                with Image.open(src) as im:
                    w, h = im.size
                rows.append({"row": len(rows), "source": f"{split}.csv", "url": f"http://example.invalid/{src.name}",
                             "label": label, "split": split, "status": "ok", "error": "", "http_status": 200,
                             "attempts": 1, "sha256": sha, "path": rel, "width": w, "height": h,
                             "bytes": len(data), "duplicate_of": -1})
    write_manifest(pd.DataFrame(rows), dest)
    return dest


def encode_image(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _colour(index: int, size: tuple[int, int]) -> Image.Image:
    """Real picture content in colour: three bundled photos as R, G and B, upscaled, with grain."""
    paths = [demo_images("test", CLASSES[(index + k) % len(CLASSES)], index + 1)[-1] for k in range(3)]
    rgb = Image.merge("RGB", [Image.open(p).convert("L") for p in paths]).resize(size, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(index).normal(128, 24, (size[1], size[0], 3))  # seeded: same bytes every call
    grain = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    return Image.blend(rgb, grain, 0.15)


def real_images() -> dict[str, bytes]:
    """Every kind of image predict and serve receive, encoded by Pillow from bundled photos."""
    photo = _colour(0, (333, 500))
    grey = Image.open(demo_images("test", "Coat", 1)[0])
    alpha = photo.resize((120, 90)).convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize((120, 90)))
    levels = np.asarray(grey.resize((50, 41)), np.uint32) * 257 + np.arange(41 * 50).reshape(41, 50) * 7
    deep = Image.fromarray((levels % 65536).astype(np.uint16))  # 16-bit greyscale, mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    frames = [_colour(i, (48, 40)).convert("P") for i in range(2)]
    return {
        "photo.jpg": encode_image(photo, "JPEG", quality=88),
        "large.jpg": encode_image(_colour(1, (1024, 683)), "JPEG", quality=80),
        "wide.png": encode_image(_colour(2, (300, 61)), "PNG"),
        "grey.png": encode_image(grey, "PNG"),
        "grey.jpg": encode_image(grey.resize((97, 130), Image.Resampling.BICUBIC), "JPEG", quality=90),
        "rgba.png": encode_image(alpha, "PNG"),
        "la.png": encode_image(alpha.convert("LA"), "PNG"),
        "palette.png": encode_image(photo.resize((81, 67)).convert("P"), "PNG"),
        "palette_transparent.png": encode_image(photo.resize((81, 67)).convert("P"), "PNG", transparency=3),
        "sixteen.png": encode_image(deep, "PNG"),
        "rotated.jpg": encode_image(_colour(3, (160, 90)), "JPEG", quality=92, exif=exif.tobytes()),
        "cmyk.jpg": encode_image(_colour(4, (70, 77)).convert("CMYK"), "JPEG", quality=90),
        "animated.gif": encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "photo.webp": encode_image(_colour(5, (257, 199)), "WEBP", quality=85),
        "exact.png": encode_image(_colour(6, (64, 64)), "PNG"),  # already the crop size: no resize at all
        "tiny.png": encode_image(_colour(7, (3, 5)), "PNG"),
    }


def state_urls(state: Path, where: str = "status IS NOT NULL") -> set[str]:
    """The URLs a download's resume state (.state.sqlite) holds an outcome for, read-only while the
    download may still be writing it; empty before the state exists."""
    from imgclf.download._state import committed_urls

    try:
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5) as db:
            if where == "status IS NOT NULL":  # committed: folded into `urls`, or in a part (Ray engine)
                return committed_urls(db)
            return {u for (u,) in db.execute(f"SELECT url FROM urls WHERE {where}")}
    except sqlite3.OperationalError:
        return set()


class ThreadedServer:
    """uvicorn serving an ASGI app in a background thread on a port the OS picks (127.0.0.1)."""

    def __init__(self, app) -> None:  # noqa: ANN001
        import threading

        import uvicorn  # here: most tests never serve, and helpers is imported by all of them

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1 (for a server a test starts as a child process)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, proc=None, seconds: float = 90, log_path: Path | None = None) -> None:  # noqa: ANN001
    """Poll BASE/health until it answers 200; fail at once if the server process `proc` has exited."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            said = log_path.read_text() if log_path else (proc.stderr.read() if proc.stderr else "")
            raise RuntimeError(f"server exited early: {said}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{base} never became healthy")

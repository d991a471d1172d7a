"""Test helpers shared by several test modules: real images, real data directories."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

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

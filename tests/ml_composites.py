"""A multi-label corpus from real images: bundled Fashion-MNIST photos pasted side by side.

Each composite is a 56x56 PNG with four slots (2x2, square so the eval centre crop keeps every slot);
each slot holds one real image of one of `labels` or stays black, so the image's label set is what it
contains ({} when every slot is empty). Written as real encoded files plus a table (path, label)
whose label cells join the set with `sep`.
"""

from __future__ import annotations

import random
from pathlib import Path

from helpers import demo_images
from PIL import Image

LABELS = ["Bag", "Sneaker", "Trouser"]  # visually distinct: a tiny model learns them in seconds


def composite(parts: list[Path | None], uid: int = 0) -> Image.Image:
    canvas = Image.new("L", (56, 56))
    # Two faint pixels from `uid` in the corner: every composite is distinct content (two all-black
    # ones would otherwise be one image to the downloader and to training, which merge by sha256).
    canvas.putpixel((uid % 56, 55), 9)
    canvas.putpixel(((uid // 56) % 56, 54), 9)
    for k, part in enumerate(parts):
        if part is not None:
            with Image.open(part) as im:
                canvas.paste(im.convert("L"), (28 * (k % 2), 28 * (k // 2)))
    return canvas.convert("RGB")


def make_corpus(dest: Path, n: int, split: str = "train", seed: int = 0, sep: str = "|",
                labels: list[str] = LABELS, empty_share: float = 0.1) -> list[tuple[str, tuple[str, ...]]]:
    """`n` composites under dest/<split>/ and their (relative path, label set) rows."""
    rng = random.Random(seed)
    pool = {label: demo_images("train" if split == "train" else "test", label, 100) for label in labels}
    out_dir = dest / split
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if rng.random() < empty_share:
            chosen: list[str] = []
        else:
            chosen = rng.sample(labels, rng.choice([1, 2]))
        slots: list[Path | None] = [rng.choice(pool[label]) for label in chosen] + [None] * (4 - len(chosen))
        rng.shuffle(slots)
        name = f"{split}_{i:04d}.png"
        composite(slots, uid=seed * 100_000 + i).save(out_dir / name)
        rows.append((f"{split}/{name}", tuple(sorted(chosen))))
    return rows


def write_table(dest: Path, rows: list[tuple[str, tuple[str, ...]]], name: str, sep: str = "|") -> Path:
    import csv

    path = dest / name
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for rel, labels in rows:
            writer.writerow([rel, sep.join(labels)])
    return path

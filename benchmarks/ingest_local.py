"""Benchmark `imgclf download FOLDER`: the full Fashion-MNIST as PNG files in an ImageFolder tree.

    apt-get install -y dataset-fashion-mnist                  # the idx files, under /usr/share/datasets
    .venv/bin/python benchmarks/ingest_local.py               # 70,000 images, 2 processes
    .venv/bin/python benchmarks/ingest_local.py --images 10000 --processes 1

The tree (TREE/{train,test}/<label>/<n>.png, 28x28 greyscale PNGs) is written once, outside the
repository (default /tmp/imgclf_bench/fashion_mnist), and reused. Then, in the same run:
  - imgclf: `python -m imgclf download TREE --out OUT --no-progress --processes P`, a fresh OUT;
    images/s = rows ok / wall time of the whole command (start-up, walk, SQLite, manifest included);
  - a rerun of the same command (nothing new: the walk and the bookkeeping alone);
  - a baseline: P plain processes that only read, decode (Pillow), sha256 and write each file by
    its hash (no validation rules, no state, no manifest): the floor of the work, for the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle_boot"]


def _idx(name: str, offset: int) -> np.ndarray:
    with gzip.open(FASHION / name) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset)


def write_tree(root: Path, limit: int) -> int:
    """TREE/{train,test}/<label>/<i>.png for the first `limit` images (train first); reuse a complete tree."""
    marker = root / f".complete-{limit}"
    if marker.exists():
        return limit
    shutil.rmtree(root, ignore_errors=True)
    n = 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(f"{prefix}-labels-idx1-ubyte.gz", 8)
        for label in CLASSES:
            (root / split / label).mkdir(parents=True, exist_ok=True)
        for i, (arr, label) in enumerate(zip(images, labels, strict=True)):
            if n >= limit:
                break
            Image.fromarray(arr, "L").save(root / split / CLASSES[label] / f"{i:05d}.png", optimize=False)
            n += 1
    marker.write_text("")
    return n


def _baseline_one(args: tuple[str, str]) -> int:
    path, out = args
    with open(path, "rb") as fh:
        data = fh.read()
    from io import BytesIO

    with Image.open(BytesIO(data)) as img:
        img.load()
    sha = hashlib.sha256(data).hexdigest()
    final = Path(out) / sha[:2] / f"{sha}.png"
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, final)
    return 1


def baseline(root: Path, out: Path, processes: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    files = [(str(p), str(out)) for p in sorted(root.glob("*/*/*.png"))]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        done = sum(pool.imap_unordered(_baseline_one, files, chunksize=256))
    return time.perf_counter() - started, done


def imgclf(root: Path, out: Path, processes: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "imgclf", "download", str(root), "--out", str(out), "--no-progress",
           "--processes", str(processes)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"imgclf download failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads((out / "download_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=70_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imgclf_bench"))
    args = parser.parse_args()
    root = args.workdir / "fashion_mnist"
    started = time.perf_counter()
    n = write_tree(root, args.images)
    print(f"tree: {n} PNGs under {root} ({time.perf_counter() - started:.1f}s to prepare)")
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"processes {args.processes}")

    out = args.workdir / "data"
    shutil.rmtree(out, ignore_errors=True)
    wall, report = imgclf(root, out, args.processes)
    ok = report["counts"].get("ok", 0)
    print(f"imgclf download: {report['total_rows']} rows, ok {ok}, duplicate "
          f"{report['counts'].get('duplicate', 0)}, in {wall:.1f}s wall -> {ok / wall:,.0f} ok images/s "
          f"({report['total_rows'] / wall:,.0f} rows/s; processing phase alone {report['images_per_s']:,.0f}/s)")
    rerun_wall, rerun = imgclf(root, out, args.processes)
    print(f"rerun, nothing new: {rerun_wall:.1f}s wall, {rerun['fetched_this_run']} processed")

    base_wall, base_n = baseline(root, args.workdir / "baseline", args.processes)
    print(f"baseline (read + decode + sha256 + write, {args.processes} processes): {base_n} files in "
          f"{base_wall:.1f}s -> {base_n / base_wall:,.0f} files/s")
    print(f"ratio imgclf rows/s / baseline files/s: {(report['total_rows'] / wall) / (base_n / base_wall):.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Issue 27, scale: `imgclf audit --model` on N Fashion-MNIST images, wall time and peak memory.

    apt-get install -y dataset-fashion-mnist            # idx files under /usr/share/datasets/fashion-mnist
    .venv/bin/python benchmarks/audit_scale.py --workdir /tmp/audit_scale --n 10000 --n 70000

For each N: a DATA_DIR of the first N*6/7 training and N/7 test images (70,000 = both splits in
full) as PNG files with a manifest, as `download` leaves it (written once, reused); then
`imgclf audit --data DATA_DIR --out ... --model weights/fashion_mnist_mobilenet_v3_small.pt` in a child
process, timed, with its peak resident memory (getrusage of the children). Prints the per-step
seconds and peak memory of audit.json, and, with two or more N, the growth exponent between the
first and last (time ~ N^a) per step and what that gives at 1,000,000 images. --reference
AUDIT_DIR compares the last N's findings with an earlier audit of the same data (e.g. one made
with the all-pairs searches): how many of its near-duplicate/leakage/conflict rows and outliers
are found again.

--duplicates-only times the near-duplicate search alone (perceptual hashes computed from the idx
files, no embedding), exact (every pair) and indexed (the inverted file used above 20,000 images),
and counts the pairs both find. --neighbours-from FOLDER does the same for the outlier step on the
embeddings cached in FOLDER (AUDIT_DIR/cache/embeddings-KEY, as far as an audit has got): seconds
exact and indexed, how many of the exact 10 nearest neighbours the index finds, the outliers of each.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from fashion_mnist import CLASSES, RAW_DIR, read_idx  # the same idx reader and class names as the training benchmark
from PIL import Image

from imgclf.manifest import write_manifest

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


def build(data: Path, n: int) -> None:
    if (data / "manifest.parquet").is_file():
        return
    n_test = n // 7
    rows = []
    for split, prefix, count in (("train", "train", n - n_test), ("test", "t10k", n_test)):
        images = read_idx(RAW_DIR / f"{prefix}-images-idx3-ubyte.gz")[:count]
        labels = read_idx(RAW_DIR / f"{prefix}-labels-idx1-ubyte.gz")[:count]
        for pixels, label in zip(images, labels, strict=True):
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            payload = buf.getvalue()
            sha = hashlib.sha256(payload).hexdigest()
            rel = f"images/{sha[:2]}/{sha}.png"
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).write_bytes(payload)
            rows.append({"row": len(rows), "source": f"{split}.csv", "url": f"http://fmnist.invalid/{len(rows)}.png",
                         "label": CLASSES[int(label)], "split": split, "status": "ok", "sha256": sha, "path": rel,
                         "width": 28, "height": 28, "bytes": len(payload), "duplicate_of": -1})
    frame = pd.DataFrame(rows)
    # exact copies (Fashion-MNIST has a few) are what download sets aside as `duplicate`
    frame.loc[frame.duplicated("sha256"), "status"] = "duplicate"
    write_manifest(frame, data)


def audit_once(data: Path, out: Path, model: Path) -> dict:
    cmd = [sys.executable, "-m", "imgclf", "audit", "--data", str(data), "--out", str(out), "--model", str(model), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"audit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads((out / "audit.json").read_text())
    # ru_maxrss of the children: the largest child so far, in KiB on Linux; one audit per child here
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"images": result["images"], "wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2),
            "timing": result["timing"], "peak_rss_gb_after": result.get("peak_rss_gb"), "counts": result["counts"],
            "load_average": round(os.getloadavg()[0], 1)}


def duplicates_only(n: int, cache: Path) -> dict:
    """The near-duplicate step alone on the first N images (hashes computed once into `cache`), in this
    process, one thread as in the audit: exact and indexed, their seconds, pairs, and the pairs in common."""
    from threadpoolctl import threadpool_limits

    from imgclf.audit import _duplicates, _embed

    if cache.is_file():
        hashes = np.load(cache)
    else:
        n_test = n // 7
        arrays = [read_idx(RAW_DIR / f"{p}-images-idx3-ubyte.gz")[:c]
                  for p, c in (("train", n - n_test), ("t10k", n_test))]
        hashes = np.stack([_embed.phash256(Image.fromarray(a, mode="L").convert("RGB"))
                           for a in np.concatenate(arrays)])
        np.save(cache, hashes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    found, seconds = {}, {}
    for name, settings in (("exact", _duplicates.DuplicateSettings(exact_below=10**9)),
                           ("indexed", _duplicates.DuplicateSettings(exact_below=0))):
        t0 = time.perf_counter()
        with threadpool_limits(1):
            pairs, _ = _duplicates.duplicate_pairs(hashes, np.ones(len(hashes), bool), settings)
        seconds[name] = round(time.perf_counter() - t0, 1)
        found[name] = set(map(tuple, pairs.tolist()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"images": len(hashes), "exact_s": seconds["exact"], "indexed_s": seconds["indexed"],
            "pairs_exact": len(found["exact"]), "pairs_indexed": len(found["indexed"]),
            "in_common": len(found["exact"] & found["indexed"]),
            "peak_rss_gb": round(peak, 2), "peak_before_gb": round(before, 2)}


def neighbours_only(folder: Path) -> dict:
    """The outlier step on cached embeddings, exact and indexed, one thread as in the audit."""
    from threadpoolctl import threadpool_limits

    from imgclf.audit import _duplicates, _outliers

    parts = sorted(folder.glob("part-*.npz"))
    features = np.concatenate([np.load(p)["vectors"] for p in parts])
    valid = np.ones(len(features), bool)
    found, seconds = {}, {}
    for name, settings in (("exact", _duplicates.DuplicateSettings(exact_below=10**9)),
                           ("indexed", _duplicates.DuplicateSettings(exact_below=0))):
        t0 = time.perf_counter()
        with threadpool_limits(1):
            found[name] = _duplicates.nearest_neighbours(features, 10, settings)
        seconds[name] = round(time.perf_counter() - t0, 1)
    exact, indexed = found["exact"], found["indexed"]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.index, indexed.index, strict=True)])
    flagged = {n: set(_outliers.find_outliers(f, valid).flagged.tolist()) for n, f in found.items()}
    return {"images": len(features), "dims": features.shape[1], "exact_s": seconds["exact"],
            "indexed_s": seconds["indexed"], "neighbour_recall_at_10": round(float(recall), 4),
            "outliers_exact": len(flagged["exact"]), "outliers_indexed": len(flagged["indexed"]),
            "outliers_in_common": len(flagged["exact"] & flagged["indexed"])}


def compare(out: Path, reference: Path) -> dict:
    """Rows of the reference audit's duplicate-kind findings and outliers found again in `out`."""
    new, ref = (pd.read_csv(d / "audit.csv", keep_default_na=False) for d in (out, reference))
    report = {}
    for name, kinds in (("duplicate_rows", ("leakage", "conflict", "near_duplicate")), ("outliers", ("outlier",))):
        a, b = (set(f.loc[f["kind"].isin(kinds), "row"]) for f in (new, ref))
        report[name] = {"reference": len(b), "now": len(a), "found_again": len(a & b)}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgclf_audit_scale"))
    ap.add_argument("--n", type=int, action="append", help="image counts, smallest first (default 10000, 70000)")
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--duplicates-only", action="store_true",
                    help="time only the near-duplicate search (hashes from the idx files, no embedding)")
    ap.add_argument("--neighbours-from", type=Path, help="AUDIT_DIR/cache/embeddings-KEY: time the outlier step alone")
    ap.add_argument("--reference", type=Path, help="an earlier AUDIT_DIR of the last N, to compare findings with")
    args = ap.parse_args()
    sizes = args.n or [10_000, 70_000]
    if args.neighbours_from:
        print(json.dumps(neighbours_only(args.neighbours_from)), flush=True)
        return 0
    if args.duplicates_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            print(json.dumps(duplicates_only(n, args.workdir / f"phash-{n}.npy")), flush=True)
        return 0
    report = []
    for n in sizes:
        data = args.workdir / f"data-{n}"
        t0 = time.perf_counter()
        build(data, n)
        print(f"data {n}: {time.perf_counter() - t0:.0f} s to write", flush=True)
        out = args.workdir / f"audit-{n}"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        report.append(audit_once(data, out, args.model))
        print(json.dumps(report[-1]), flush=True)
    if args.reference:
        print(json.dumps({"compared_with": str(args.reference), **compare(out, args.reference)}), flush=True)
    if len(report) >= 2:
        a, b = report[0], report[-1]
        grow = math.log(b["wall_s"] / a["wall_s"]) / math.log(b["images"] / a["images"])
        grow_mem = math.log(b["peak_rss_gb"] / a["peak_rss_gb"]) / math.log(b["images"] / a["images"])
        scale = 1_000_000 / b["images"]
        steps = {k: round(math.log(max(b["timing"][k], 0.01) / max(a["timing"][k], 0.01))
                          / math.log(b["images"] / a["images"]), 2) for k in b["timing"] if k in a["timing"]}
        print(json.dumps({"time_exponent": round(grow, 2), "memory_exponent": round(grow_mem, 2),
                          "step_exponents": steps,
                          "at_1M_wall_h": round(b["wall_s"] * scale ** grow / 3600, 1),
                          "at_1M_peak_gb": round(b["peak_rss_gb"] * scale ** grow_mem, 1)}), flush=True)
    (args.workdir / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training's stream over a 100M-row parts manifest: the split and class counts from one streaming
pass, then the train DataLoader's first batches, with the time to the first batch and the peak
memory of the loading process and of its workers (issue 25, item 2: train without loading a billion
rows; goal < 4 GB). No network: synthetic manifest rows (benchmarks/manifest_scale.py's template,
its 64-hex sha256 kept, so the hash split draws over them) whose `path` points at 8 real bundled
PNGs copied into DATA_DIR.

    PYTHONPATH=src .venv/bin/python benchmarks/stream_scale.py                      # 100,000,000 rows
    PYTHONPATH=src .venv/bin/python benchmarks/stream_scale.py --rows 10000000 --part-rows 1000000

Steps, in a fresh process after the write (so its peak RSS is the reader's alone):
1. `train._stream.stream_split`: every usable train row's label and sha256 read once, the val
   rule applied, counts kept (what split.csv and the class list were);
2. `_stream.loaders(...)` and the first --batches batches of the train loader (2 workers, 256
   images each, decoded and augmented at 32 px): time to the first batch, then the rate.
Printed: each step's seconds and rows, peak RSS (VmHWM) of the main process, the largest peak of
a worker process (getrusage of the children), the largest PSS of the main process and its workers
together (sampled after each batch), and main + 2 x worker RSS as a crude upper bound.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import manifest_scale  # noqa: E402
import pyarrow as pa  # noqa: E402

from imgclf import manifest  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "train"
IMAGES = 8


def real_images(data_dir: Path) -> list[str]:
    """IMAGES bundled PNGs copied into DATA_DIR/images; their paths relative to DATA_DIR."""
    sources = sorted(DEMO.glob("*/*.png"))[:: max(1, len(sorted(DEMO.glob("*/*.png"))) // IMAGES)][:IMAGES]
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, src in enumerate(sources):
        rel = f"images/real-{i}.png"
        shutil.copyfile(src, data_dir / rel)
        paths.append(rel)
    return paths


def write(data_dir: Path, rows: int, part_rows: int) -> None:
    paths = real_images(data_dir)
    started = time.monotonic()
    template = manifest_scale._template()
    print(f"template of {manifest_scale.TEMPLATE:,} rows built in {time.monotonic() - started:.1f}s")
    ok = pa.compute.equal(template["status"], "ok").to_numpy(zero_copy_only=False)
    real = [paths[i % len(paths)] if o else "" for i, o in enumerate(ok)]
    template = template.set_column(template.schema.get_field_index("path"), "path", pa.array(real, pa.string()))
    manifest_scale.write(data_dir, rows, part_rows, template)


def _peak_mib() -> float:
    return manifest_scale._peak_mib()


def _pss_mib() -> float:
    """Proportional set size of this process and its children (the loader workers) together: pages
    shared after fork counted once, unlike summing each worker's RSS."""
    pids = [str(Path("/proc/self").resolve().name)]
    for task in Path("/proc/self/task").iterdir():
        pids += (task / "children").read_text().split()
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:  # a worker that just exited
            pass
    return total / 1024


def read(data_dir: Path, batches: int) -> None:
    from imgclf import presets
    from imgclf.config import load_config
    from imgclf.train import _stream

    config = load_config(None, ["data.image_size=32", "trainer.batch_size=256", "data.num_workers=2"])
    print(f"peak RSS after importing torch, lightning and imgclf: {_peak_mib():,.0f} MiB")
    t = time.monotonic()
    split = _stream.stream_split(config, data_dir, data_dir / "no-run", resume=False)
    print(f"split and class counts (one streaming pass of label and sha256): {split.rows('train'):,} train, "
          f"{split.rows('val'):,} val rows, {len(split.class_names)} classes in {time.monotonic() - t:.1f}s; "
          f"peak RSS {_peak_mib():,.0f} MiB")
    pre = presets.Preprocessing.from_config(config.data)
    t = time.monotonic()
    train_loader, _ = _stream.loaders(config, split, split.class_names, pre)
    it = iter(train_loader)
    images, targets = next(it)
    first = time.monotonic() - t
    seen, pss = len(targets), _pss_mib()
    t2 = time.monotonic()
    for _ in range(batches - 1):
        images, targets = next(it)
        seen += len(targets)
        pss = max(pss, _pss_mib())
    rate = (seen - 256) / max(time.monotonic() - t2, 1e-9)
    del it  # joins the workers, so their peak is in the children's rusage
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"train loader: {len(train_loader):,} batches per epoch; first batch {tuple(images.shape)} after "
          f"{first:.1f}s; {batches} batches ({seen:,} images) at {rate:,.0f} images/s after it")
    print(f"peak RSS: main {_peak_mib():,.0f} MiB, largest worker {child:,.0f} MiB (its RSS counts the pages "
          f"it shares with the main process); largest PSS of main + workers together, sampled after each "
          f"batch: {pss:,.0f} MiB; main + 2 x worker RSS {_peak_mib() + 2 * child:,.0f} MiB (goal < 4,096)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--part-rows", type=int, default=manifest.PART_ROWS)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep it (default: a temporary folder)")
    ap.add_argument("--read-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read_only:
        read(args.read_only, args.batches)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="stream-scale-"))
    try:
        if not (work / manifest.PARTS_DIR / manifest.PARTS_INDEX).is_file():
            write(work, args.rows, args.part_rows)
        subprocess.run([sys.executable, __file__, "--read-only", str(work), "--batches", str(args.batches)],
                       check=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

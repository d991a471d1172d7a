"""A 100M-row manifest as parts: opened, filtered by split, walked for one training epoch, and the
reader's peak memory (issue 25, item 2). No network, no images: synthetic manifest rows.

    .venv/bin/python benchmarks/manifest_scale.py                        # 100,000,000 rows, parts of 5M
    .venv/bin/python benchmarks/manifest_scale.py --rows 2000000 --keep /tmp/m   # smaller, kept

1. write: synthetic rows (80% train / 10% val / 10% test, 90% ok, distinct 64-hex sha256 and
   content-addressed paths within a template of 1M rows that every million repeats with its own
   `row` numbers) through the download's own parts writer (`download._report._Parts`), in batches
   of 20,000 rows as `write_outputs` streams them: DATA_DIR/manifest/_index.json + parts.
2. read, in a fresh process (so its peak RSS is the reader's alone): `manifest.dataset` (open),
   row counts per split, `manifest.scan(columns=["row", "label"], split="test", status="ok")` (a
   split's rows and labels as a pandas frame), then one epoch of the train split with `manifest.epoch_batches`
   (columns row, path, label; 64 row groups shuffled together). Printed: seconds for each step,
   rows seen, and the peak RSS (VmHWM) of the reading process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from imgclf import manifest  # noqa: E402

TEMPLATE = 1_000_000
BATCH = 20_000  # what download/_report.write_outputs streams


def _template() -> pa.Table:
    """1M synthetic manifest rows in the contract's columns and types."""
    n = TEMPLATE
    i = np.arange(n)
    rng = np.random.default_rng(0)
    shas = [hashlib.blake2b(int(k).to_bytes(8, "big"), digest_size=32).hexdigest() for k in range(n)]
    u = rng.random(n)
    split = np.where(u < 0.8, "train", np.where(u < 0.9, "val", "test"))
    ok = rng.random(n) < 0.9
    status = np.where(ok, "ok", "http_error")
    columns = {
        "row": i, "source": ["urls.csv"] * n,
        "url": [f"https://img{k % 5000}.example.com/p/{k}.jpg" for k in range(n)],
        "label": [f"c{k % 1000}" for k in range(n)], "split": split.tolist(), "status": status.tolist(),
        "error": np.where(ok, "", "HTTP 404").tolist(), "http_status": np.where(ok, 200, 404),
        "attempts": np.ones(n, dtype=np.int64),
        "sha256": [s if o else "" for s, o in zip(shas, ok, strict=True)],
        "path": [f"images/{s[:2]}/{s}.jpg" if o else "" for s, o in zip(shas, ok, strict=True)],
        "width": np.where(ok, 256, 0), "height": np.where(ok, 192, 0), "bytes": np.where(ok, 30_000, 0),
        "duplicate_of": np.full(n, -1), "shard": [""] * n, "offset": np.full(n, -1),
    }
    schema = pa.schema([(name, pa.int64() if dtype == "int64" else pa.string())
                        for name, dtype in manifest.COLUMNS.items()])
    return pa.table({name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names},
                    schema=schema)


def write(data_dir: Path, rows: int, part_rows: int, template: pa.Table | None = None) -> None:
    """`rows` rows as parts: `template` (default `_template()`) repeated with its own row numbers."""
    from imgclf.download._report import _Parts

    if template is None:
        started = time.monotonic()
        template = _template()
        print(f"template of {TEMPLATE:,} rows built in {time.monotonic() - started:.1f}s")

    def batches():  # noqa: ANN202
        for first in range(0, rows, TEMPLATE):
            block = template.slice(0, min(TEMPLATE, rows - first))
            block = block.set_column(0, "row", pa.array(np.arange(first, first + block.num_rows)))
            for start in range(0, block.num_rows, BATCH):
                yield block.slice(start, BATCH)

    started = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    _Parts(data_dir, part_rows).write(batches())
    size = sum(p.stat().st_size for p in (data_dir / manifest.PARTS_DIR).rglob("*") if p.is_file())
    parts = len(json.loads((data_dir / manifest.PARTS_DIR / manifest.PARTS_INDEX).read_text())["parts"])
    print(f"written: {rows:,} rows as {parts} parts in {time.monotonic() - started:.1f}s, "
          f"{size / 2**30:.2f} GiB ({size / rows:.0f} bytes/row)")


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read(data_dir: Path) -> None:
    import pyarrow.dataset as ds

    t = time.monotonic()
    data = manifest.dataset(data_dir)
    total = data.count_rows()
    print(f"open: {total:,} rows in {len(data.files)} parts, {time.monotonic() - t:.2f}s; "
          f"peak RSS {_peak_mib():,.0f} MiB")
    t = time.monotonic()
    from imgclf.predict import _ray  # `predict --engine ray`'s driver plan: footers only, no row read

    units = _ray.expand_units([str(data_dir)], 1000)
    shards = _ray.cut_shards(units, 1000)
    _ray._plan_key("model.onnx", "auto", units, _ray.PredictOptions(), "csv", 1000)
    print(f"predict --engine ray plan (slices of <= 1,000 rows from the parts' footers, shards, resume key): "
          f"{len(units):,} slices, {len(shards):,} shards, {time.monotonic() - t:.1f}s; "
          f"peak RSS {_peak_mib():,.0f} MiB")
    del units, shards
    t = time.monotonic()
    per_split = {s: data.count_rows(filter=(ds.field("split") == s) & (ds.field("status") == "ok"))
                 for s in ("train", "val", "test")}
    print(f"usable rows per split {per_split}: {time.monotonic() - t:.1f}s; peak RSS {_peak_mib():,.0f} MiB")
    t = time.monotonic()
    test = manifest.scan(data_dir, columns=["row", "label"], split="test", status="ok")
    print(f"scan(split=test, status=ok, columns row and label, as pandas): {len(test):,} rows in "
          f"{time.monotonic() - t:.1f}s; "
          f"peak RSS {_peak_mib():,.0f} MiB")
    del test
    t = time.monotonic()
    seen, checksum = 0, 0
    for batch in manifest.epoch_batches(data_dir, "train", seed=0, columns=["row", "path", "label"]):
        seen += len(batch)
        checksum ^= int(batch["row"].iloc[0])  # touch the data
    elapsed = time.monotonic() - t
    assert seen == per_split["train"], (seen, per_split["train"])
    print(f"one epoch of train (epoch_batches, 65,536-row batches, 64 row groups shuffled together): {seen:,} rows "
          f"in {elapsed:.1f}s = {seen / elapsed:,.0f} rows/s; peak RSS {_peak_mib():,.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--part-rows", type=int, default=manifest.PART_ROWS)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep it (default: a temporary folder)")
    ap.add_argument("--read-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read_only:
        read(args.read_only)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="manifest-scale-"))
    try:
        if not (work / manifest.PARTS_DIR / manifest.PARTS_INDEX).is_file():
            write(work, args.rows, args.part_rows)
        subprocess.run([sys.executable, __file__, "--read-only", str(work)], check=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

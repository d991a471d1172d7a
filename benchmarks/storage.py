"""Storage and reading at scale: tar shards vs files, a folder vs S3, and predict --engine ray.

    .venv/bin/python benchmarks/storage.py read [--per-class 150] [--rounds 3] [--workers 0 2]
    .venv/bin/python benchmarks/storage.py roundtrip [--per-class 40]
    .venv/bin/python benchmarks/storage.py predict [--per-class 100] [--workers 2]

Every image is a bundled Fashion-MNIST PNG downloaded by the real downloader from a local HTTP
server; S3 is moto's server on 127.0.0.1 (needs the dev extra), so S3 figures include a real HTTP
round trip per request but no network latency.

read      the training read path (data.DecodedImages: read_row + decode + resize, no augmentation)
          over the same images stored four ways: files and tar, local and on S3, and S3 tar with
          data.shard_cache (round 1 fetches each shard once, later rounds read the local copies).
          Rounds alternate the layouts, so load from other processes hits each alike; the figure
          is images/s and the ratio to local files. moto's server runs in its own process.
roundtrip download to S3 (tar shards), train 1 epoch with 2 DDP processes (gloo) reading the shards
          from S3, evaluate from S3 and from local files: the metrics must be identical.
predict   images/s of `imgclf predict` in one process vs `--engine ray --workers N`, over the same
          folder, Ray's start-up included (and reported apart). Give one N per run: a second private
          Ray started in the same process right after the first failed here ("Failed to start GCS").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import CLASSES, DEMO_ROOT  # noqa: E402
from storage_helpers import demo_files, download_demo, moto_s3, write_sources  # noqa: E402

from imgclf._localserver import LocalServer  # noqa: E402


def _download_all(tmp: Path, splits: dict[str, list[Path]], where: dict[str, tuple[str, str]]) -> None:
    with LocalServer(DEMO_ROOT) as srv:
        tables = write_sources(tmp / "src", srv, splits)
        for name, (out, layout) in where.items():
            t0 = time.perf_counter()
            result = download_demo(out, tables, layout=layout, shard_size=500, state_dir=None
                                   if not out.startswith("s3://") else str(tmp / f"state-{name}"))
            print(f"download {name:10} {result.counts} in {time.perf_counter() - t0:.1f}s", flush=True)


def read(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from imgclf import data, presets
    from imgclf.config import DataConfig

    torch.set_num_threads(1)
    pre = presets.Preprocessing.from_config(DataConfig(image_size=64))
    with tempfile.TemporaryDirectory() as tmp_name, moto_s3("bench", own_process=True):
        tmp = Path(tmp_name)
        where = {"files": (str(tmp / "files"), "files"), "tar": (str(tmp / "tar"), "tar"),
                 "s3-files": ("s3://bench/files", "files"), "s3-tar": ("s3://bench/tar", "tar")}
        _download_all(tmp, {"train": demo_files("train", CLASSES, args.per_class)}, where)
        where["s3-tar+cache"] = ("s3://bench/tar", "tar")  # data.shard_cache: one GET per shard, then local
        split = data.make_split(tmp / "files", 0.0001, seed=0)
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for workers in args.workers:
                for name, (out, _) in where.items():
                    cache = str(tmp / f"cache-{workers}") if name.endswith("+cache") else None  # cold in round 1
                    dataset = data.DecodedImages(split, out, CLASSES, pre.resize_size, presets.eval_resize(pre),
                                                 shard_cache=cache)
                    loader = DataLoader(dataset, batch_size=64, num_workers=workers, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
                    t0 = time.perf_counter()
                    n = sum(len(batch[0]) for batch in loader)
                    rates.setdefault((name, workers), []).append(n / (time.perf_counter() - t0))
                    print(f"  pass: {name:9} workers {workers}: {rates[(name, workers)][-1]:7.1f} images/s",
                          flush=True)
        print(f"\n{len(split)} images, {args.rounds} rounds, median images/s (ratio to local files)")
        for workers in args.workers:
            base = statistics.median(rates[("files", workers)])
            for name in where:
                rate = statistics.median(rates[(name, workers)])
                print(f"  loader workers {workers}  {name:9} {rate:8.1f}  ({rate / base:.2f}x)")


def roundtrip(args: argparse.Namespace) -> None:
    from imgclf.stages import evaluate

    with tempfile.TemporaryDirectory() as tmp_name, moto_s3("bench", own_process=True):
        tmp = Path(tmp_name)
        splits = {"train": demo_files("train", CLASSES, args.per_class),
                  "test": demo_files("test", CLASSES, args.per_class // 4)}
        _download_all(tmp, splits, {"s3-tar": ("s3://bench/data", "tar"), "local": (str(tmp / "local"), "files")})
        cmd = [sys.executable, "-m", "imgclf", "train", "--data", "s3://bench/data", "--out", str(tmp / "run"),
               "trainer.epochs=1", "trainer.batch_size=32", "data.image_size=64", "data.num_workers=1",
               "data.cache=false", "trainer.progress_bar=false", "model.arch=mobilenet_v3_small",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        print(f"train 1 epoch, 2 DDP processes, from s3 tar shards: rc {done.returncode} in "
              f"{time.perf_counter() - t0:.1f}s")
        if done.returncode:
            print(done.stderr[-3000:])
            return
        shipped = REPO / "weights" / "fashion_mnist_mobilenet_v3_small.pt"  # a model that has learned
        for label, model in (("the 1-epoch DDP run", tmp / "run"), ("the shipped weights", shipped)):
            results = {}
            for name, data_dir in (("s3-tar", "s3://bench/data"), ("local files", tmp / "local")):
                t0 = time.perf_counter()
                results[name] = evaluate.run(evaluate.EvaluateOptions(
                    model=model, data=data_dir, num_workers=0, out=tmp / f"eval-{label[-7:]}-{len(results)}"))
                m = results[name]
                print(f"{label}, evaluated from {name:11}: {m['n_images']} images, f1_macro {m['f1_macro']:.4f}, "
                      f"accuracy {m['accuracy']:.4f} in {time.perf_counter() - t0:.1f}s")
            keys = ("n_images", "f1_macro", "accuracy", "log_loss", "confusion_matrix")
            same = all(results["s3-tar"][k] == results["local files"][k] for k in keys)
            print(f"  identical metrics ({', '.join(keys)}): {same}")


def predict(args: argparse.Namespace) -> None:
    from imgclf import _ray
    from imgclf.predict import _ray as on_ray
    from imgclf.stages import predict as single

    model = REPO / "weights" / "fashion_mnist_mobilenet_v3_small.pt"
    options = single.PredictOptions(progress=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        folder = Path(tmp_name) / "photos"
        folder.mkdir()
        files = demo_files("test", CLASSES, args.per_class)
        for f in files:
            (folder / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
        t0 = time.perf_counter()
        single.run(dataclasses.replace(options, inputs=[str(folder)], model=model, out=Path(tmp_name) / "one.csv"))
        base = len(files) / (time.perf_counter() - t0)
        print(f"{len(files)} images; one process: {base:.1f} images/s")
        for workers in args.workers:
            t0 = time.perf_counter()
            with _ray.connect(None, workers):
                started = time.perf_counter() - t0
                t1 = time.perf_counter()
                on_ray.run(dataclasses.replace(options, inputs=(str(folder),), model=model,
                                               out=Path(tmp_name) / f"ray{workers}.csv"),
                           on_ray.RayOptions(workers=workers, shard_size=args.shard_size))
                work = time.perf_counter() - t1
            total = time.perf_counter() - t0
            print(f"  --engine ray --workers {workers}: {len(files) / total:.1f} images/s with Ray's start-up "
                  f"({started:.1f}s) and stop, {len(files) / work:.1f} without ({len(files) / work / base:.2f}x "
                  "one process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("read")
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p = sub.add_parser("roundtrip")
    p.add_argument("--per-class", type=int, default=40)
    p = sub.add_parser("predict")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--shard-size", type=int, default=100)
    args = parser.parse_args()
    {"read": read, "roundtrip": roundtrip, "predict": predict}[args.what](args)


if __name__ == "__main__":
    main()

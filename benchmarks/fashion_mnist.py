"""Fashion-MNIST end to end: image files -> local HTTP -> download -> train -> evaluate.

    .venv/bin/python benchmarks/fashion_mnist.py --config configs/fashion_mnist.yaml \
        --work /tmp/imgclf_fmnist [--ship weights/fashion_mnist_mobilenet_v3_small.pt] [key=value ...]

1. writes the 70,000 images of the Debian package dataset-fashion-mnist (idx files under
   /usr/share/datasets/fashion-mnist) as PNG files, once, under WORK/images/{train,test}/<class>/;
2. serves them on 127.0.0.1 and lists them in WORK/sources/{train,test}.csv (url,label);
3. runs the real stages: download -> train (the named config) -> evaluate on the test split;
4. prints wall time per stage, test F1-macro and accuracy, and writes WORK/summary.json.

--ship PATH writes the best checkpoint as a slim file (no optimizer state) for weights/;
--card PATH then writes its model card from benchmarks/model_card_template.md. The issue-23
record attempt (on a quiet 2-core machine; about an hour):

    .venv/bin/python benchmarks/fashion_mnist.py --config configs/fashion_mnist_record.yaml \
        --run-name record --tta flip --ship weights/fashion_mnist_record.pt \
        --card weights/MODEL_CARD_record.md
--tta flip|crops also evaluates the test split with test-time augmentation (same weights; the
plain single-pass figures are printed too).
--limit N keeps N images per class and split (a smoke test of the pipeline in a minute).
Nothing is written into the source tree unless --ship names a path there.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

RAW_DIR = Path("/usr/share/datasets/fashion-mnist")
# Official label order; names as in the bundled demo sample (no '/' in a folder name).
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "train"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "t10k")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian header: magic, dims) as a uint8 array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_images(raw_dir: Path, root: Path, limit: int | None) -> dict[str, list[tuple[str, str]]]:
    """PNG files per split and class; returns split -> [(relative path, label)]. Reuses finished files."""
    listing: dict[str, list[tuple[str, str]]] = {}
    for split, (images_name, labels_name, prefix) in FILES.items():
        images, labels = read_idx(raw_dir / images_name), read_idx(raw_dir / labels_name)
        taken = dict.fromkeys(range(len(CLASSES)), 0)
        rows = []
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            if limit is not None and taken[int(label)] >= limit:
                continue
            taken[int(label)] += 1
            rel = f"{split}/{CLASSES[label]}/{prefix}_{i:05d}.png"
            path = root / rel
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
                tmp.replace(path)
            rows.append((rel, CLASSES[label]))
        listing[split] = rows
    return listing


def write_sources(listing: dict[str, list[tuple[str, str]]], base_url: str, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in listing.items():
        path = out_dir / f"{split}.csv"
        path.write_text("url,label\n" + "".join(f"{base_url}/{rel},{label}\n" for rel, label in rows))
        paths.append(path)
    return paths


def ship(best_checkpoint: Path, dest: Path) -> Path:
    """Slim copy of a Lightning checkpoint: model tensors + imgclf metadata, no optimizer state."""
    from imgclf import checkpoint

    ckpt = checkpoint.read_checkpoint(best_checkpoint)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return checkpoint.save_slim(dest, state, ckpt["imgclf"])


def write_card(dest: Path, summary: dict, args: argparse.Namespace, run_dir: Path) -> Path:
    """The model card of a shipped run: benchmarks/model_card_template.md with the run's figures."""
    import datetime
    import platform
    import string

    import pandas as pd

    from imgclf.config import load_config

    config = load_config(run_dir / "config.yaml")
    report = pd.read_csv(run_dir / "classification_report.csv")
    rows = report[report["class"].isin(CLASSES)]
    per_class = "\n".join(["| class | precision | recall | F1 |", "|---|---|---|---|"] + [
        f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} |"
        for _, r in rows.iterrows()])
    tta = next((v for k, v in summary.items() if k.startswith("tta_")), None)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    fields = {
        "weights_name": str(args.ship), "weights_mb": f"{summary['shipped_bytes'] / 1e6:.1f}",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": str(args.config), "overrides": " ".join(args.overrides) or "none",
        "val_fraction": config.data.val_fraction, "test_images": summary["test_images"],
        "arch": config.model.arch, "seed": config.seed, "epochs": summary["epochs_run"],
        "train_minutes": f"{summary['seconds']['train'] / 60:.1f}", "budget": config.trainer.max_time_minutes,
        "best_val": f"{summary['best_val']:.4f}", "host": cpu or "unknown CPU", "cpu_cores": summary["cpu_cores"],
        "torch_threads": summary["torch_threads"], "date": datetime.date.today().isoformat(),
        "f1": f"{summary['test_f1_macro']:.4f}", "f1_lo": f"{summary['test_f1_macro_ci95'][0]:.4f}",
        "f1_hi": f"{summary['test_f1_macro_ci95'][1]:.4f}", "accuracy": f"{summary['test_accuracy']:.4f}",
        "tta_row": (f"| F1-macro with `--tta {args.tta}` | {tta['test_f1_macro']:.4f} "
                    f"(95% CI {tta['test_f1_macro_ci95'][0]:.4f}-{tta['test_f1_macro_ci95'][1]:.4f}) |") if tta else "",
        "per_class_table": per_class,
    }
    template = (Path(__file__).resolve().parent / "model_card_template.md").read_text()
    dest.write_text(string.Template(template).substitute(fields))
    return dest


def _write_and_download(args: argparse.Namespace, work: Path, data_dir: Path,
                        timings: dict[str, float]) -> None:
    from imgclf._localserver import LocalServer
    from imgclf.stages import download

    t0 = time.perf_counter()
    listing = write_images(args.raw, work / "images", args.limit)
    timings["write_png"] = time.perf_counter() - t0
    print(f"== images: {sum(len(v) for v in listing.values())} PNG files in {timings['write_png']:.0f}s",
          flush=True)

    with LocalServer(work / "images") as server:
        sources = write_sources(listing, server.base_url, work / "sources")
        t0 = time.perf_counter()
        result = download.run(download.DownloadOptions(sources=sources, out=data_dir, show_progress=False))
        timings["download"] = time.perf_counter() - t0
    print(f"== download: {result.counts} in {timings['download']:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs"
                        / "fashion_mnist.yaml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf_fmnist"))
    parser.add_argument("--raw", type=Path, default=RAW_DIR, help="folder with the four idx .gz files")
    parser.add_argument("--limit", type=int, default=None, help="images per class and split (smoke test)")
    parser.add_argument("--ship", type=Path, default=None, help="write the best model, slim, to this file")
    parser.add_argument("--card", type=Path, default=None,
                        help="with --ship: write the shipped model's card to this file (from model_card_template.md)")
    parser.add_argument("--run-name", default="run", help="run directory under WORK (must be new)")
    parser.add_argument("--reuse-data", action="store_true",
                        help="skip writing and downloading when WORK/data already has a manifest "
                             "(the served URLs change port on every run, so a rerun would fetch anew)")
    parser.add_argument("--tta", choices=("none", "flip", "crops"), default="none",
                        help="also evaluate with this test-time augmentation (into RUN_DIR/tta-MODE/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.card and not args.ship:
        parser.error("--card describes the shipped file: give --ship PATH too")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from imgclf.config import load_config
    from imgclf.stages import evaluate, train

    config = load_config(args.config, args.overrides)
    work = args.work
    data_dir, run_dir = work / "data", work / args.run_name
    timings: dict[str, float] = {}

    if args.reuse_data and (data_dir / "manifest.parquet").is_file():
        print(f"== reusing {data_dir} (no write, no download)", flush=True)
    else:
        _write_and_download(args, work, data_dir, timings)

    t0 = time.perf_counter()
    trained = train.run(train.TrainOptions(config, data_dir, run_dir))
    timings["train"] = time.perf_counter() - t0
    print(f"== train: {trained.epochs_run} epochs in {timings['train']:.0f}s, best val "
          f"{config.trainer.monitor} {trained.best_score}", flush=True)

    t0 = time.perf_counter()
    metrics = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=data_dir, split="test"))
    timings["evaluate"] = time.perf_counter() - t0
    tta = None
    if args.tta != "none":
        t0 = time.perf_counter()
        tta = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=data_dir, split="test", tta=args.tta,
                                                    out=run_dir / f"tta-{args.tta}"))
        timings[f"evaluate_tta_{args.tta}"] = time.perf_counter() - t0

    summary = {
        "config": str(args.config), "overrides": args.overrides, "cpu_cores": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(), "limit": args.limit,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "epochs_run": trained.epochs_run, "best_val": trained.best_score,
        "test_f1_macro": metrics["f1_macro"], "test_f1_macro_ci95": metrics["f1_macro_ci95"],
        "test_accuracy": metrics["accuracy"],
        "test_images": metrics["n_images"], "run_dir": str(run_dir), "python": sys.version.split()[0],
    }
    if tta is not None:
        summary[f"tta_{args.tta}"] = {"test_f1_macro": tta["f1_macro"], "test_f1_macro_ci95": tta["f1_macro_ci95"],
                                      "test_accuracy": tta["accuracy"]}
    if args.ship:
        summary["shipped"] = str(ship(trained.best_checkpoint, args.ship))
        summary["shipped_bytes"] = args.ship.stat().st_size
        if args.card:
            summary["card"] = str(write_card(args.card, summary, args, run_dir))
    (work / f"summary-{args.run_name}.json").write_text(json.dumps(summary, indent=2))
    print("== summary")
    print(json.dumps(summary, indent=2))
    lo, hi = metrics["f1_macro_ci95"]
    print(f"test F1-macro {metrics['f1_macro']:.4f} [95% CI {lo:.4f}, {hi:.4f}], accuracy {metrics['accuracy']:.4f}"
          + (f"; with --tta {args.tta}: F1-macro {tta['f1_macro']:.4f} [{tta['f1_macro_ci95'][0]:.4f}, "
             f"{tta['f1_macro_ci95'][1]:.4f}], accuracy {tta['accuracy']:.4f}" if tta else "")
          + "; time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

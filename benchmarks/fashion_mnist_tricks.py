"""Ablation of the training-speed records' tricks (issue 23) at a fixed number of epochs.

    nice -n 5 .venv/bin/python benchmarks/fashion_mnist_tricks.py --work /tmp/imgclf_tricks \
        [--per-class 1000 | --demo] [--epochs 4] [--threads 1] [--variants baseline,alt_flip,...] \
        [--tta-variants baseline,all]

Data: --per-class N Fashion-MNIST images per class and split (1000: 10,000 training images, 9,000
train + 1,000 val after the split, and all 10,000 test images), written as PNG, served on 127.0.0.1 and
downloaded with the real download stage once (reused from WORK/data on the next call); --demo: the
bundled demo sample (3,000 train images, 1,000 test) instead. Each variant
trains configs/fashion_mnist_resnet18_half.yaml (the half-width ResNet-18 at 28 px, label smoothing 0.1,
random flip, AdamW) for a FIXED number of epochs in fp32 on --threads torch threads, with one or more
trick switched on, and is evaluated on the test images single pass (and with --tta crops, the
translate + mirror TTA, for --tta-variants). Accuracy at a fixed number of epochs does not depend on
the machine's load; the times do (the figures say when the machine was shared).

Prints one line per variant as it finishes, a markdown table at the end, and appends each result as a
JSON line to WORK/tricks.jsonl. Nothing is written into the source tree.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist  # noqa: E402  (benchmarks/ is no package: the idx reader and the download step)

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "fashion_mnist_resnet18_half.yaml"

# Each trick alone (on top of the base recipe), then together. The base already has label smoothing
# 0.1, so that trick is measured by taking it away.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "no_label_smoothing": ["loss.label_smoothing=0.0"],
    "alt_flip": ["data.augment.hflip=alternate"],
    "lookahead": ["optim.lookahead_steps=5"],
    # SGD's weight decay is coupled (L2), so AdamW's 0.05 would be far too strong: airbench's 5e-4 scale.
    "sgd_nesterov": ["optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0.0005", "optim.nesterov=true"],
    "identity_stem": ["model.stem_init=identity"],
    "whiten_stem": ["model.stem_init=whiten"],
    "progressive": ["data.augment.progressive_min_size=16", "data.augment.progressive_until=0.75"],
    "all": ["data.augment.hflip=alternate", "optim.lookahead_steps=5", "model.stem_init=whiten",
            "data.augment.progressive_min_size=16", "data.augment.progressive_until=0.75"],
    # "all" without progressive resizing, the one that cost most alone at this budget.
    "all_but_progressive": ["data.augment.hflip=alternate", "optim.lookahead_steps=5", "model.stem_init=whiten"],
}


def fixed_budget(epochs: int, threads: int) -> list[str]:
    """Overrides that make every variant the same fixed budget: epochs, fp32, threads, no time limit."""
    return [f"trainer.epochs={epochs}", "trainer.max_time_minutes=null", "trainer.precision='32'",
            f"trainer.cpu_threads={threads}", "trainer.progress_bar=false", "data.num_workers=0"]


def prepare_data(work: Path, per_class: int, demo: bool) -> Path:
    data_dir = work / "data"
    if (data_dir / "manifest.parquet").is_file():
        print(f"== reusing {data_dir}", flush=True)
        return data_dir
    if demo:  # the bundled sample (3,000 train, 1,000 test, 3 broken links), served and downloaded
        from imgclf import demo as sample
        from imgclf._localserver import LocalServer
        from imgclf.stages import download

        with LocalServer(sample.SAMPLE_ROOT) as server:
            sources = sample.write_sources(server.base_url, work / "sources")
            download.run(download.DownloadOptions(sources=sources, out=data_dir, show_progress=False))
        return data_dir
    args = argparse.Namespace(raw=fashion_mnist.RAW_DIR, limit=per_class)
    fashion_mnist._write_and_download(args, work, data_dir, {})
    return data_dir


def train_once(name: str, overrides: list[str], data_dir: Path, work: Path) -> tuple[Path, dict]:
    """WORK/run-NAME trained with the variant's config; a finished one (run.json status done) is reused,
    so a stopped ablation goes on where it was. Returns the run directory and its run.json."""
    from imgclf import rundir
    from imgclf.config import load_config
    from imgclf.stages import train

    run_dir = work / f"run-{name}"
    info = rundir.RunDir(run_dir).read_info() if run_dir.is_dir() else None
    if info is not None and info.status == "done":
        print(f"== {name}: reusing the trained {run_dir}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped midway: start it over
        train.run(train.TrainOptions(load_config(BASE_CONFIG, overrides), data_dir, run_dir))
    return run_dir, json.loads((run_dir / "run.json").read_text())


def run_variant(name: str, overrides: list[str], data_dir: Path, work: Path, tta: bool, threads: int) -> dict:
    import torch

    from imgclf.stages import evaluate

    run_dir, info = train_once(name, overrides, data_dir, work)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    # train.run restores the process's thread count; evaluate on the same threads as training: on a shared
    # machine, OpenMP threads beyond the process's share spin-wait (10k test images took 651 s at 2 threads).
    torch.set_num_threads(threads)
    single = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=data_dir, split="test"))
    result = {"variant": name, "overrides": overrides, "epochs": info["epochs_run"],
              "train_seconds": info["last_seconds"], "images_per_s": round(float(metrics["images_per_s"].mean()), 1),
              "best_val_f1": info["best_score"], "test_f1": single["f1_macro"],
              "test_f1_ci95": single["f1_macro_ci95"], "test_accuracy": single["accuracy"],
              "test_images": single["n_images"], "run_dir": str(run_dir)}
    if tta:
        crops = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=data_dir, split="test", tta="crops",
                                                      out=run_dir / "tta-crops"))
        result["tta_crops_f1"], result["tta_crops_f1_ci95"] = crops["f1_macro"], crops["f1_macro_ci95"]
    return result


def table(results: list[dict]) -> str:
    base = next((r["test_f1"] for r in results if r["variant"] == "baseline"), None)
    lines = ["| variant | test F1-macro (95% CI) | vs baseline | + TTA crops | train min | images/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lo, hi = r["test_f1_ci95"]
        delta = f"{r['test_f1'] - base:+.4f}" if base is not None else ""
        tta = f"{r['tta_crops_f1']:.4f}" if "tta_crops_f1" in r else ""
        lines.append(f"| {r['variant']} | {r['test_f1']:.4f} ({lo:.4f}-{hi:.4f}) | {delta} | {tta} | "
                     f"{r['train_seconds'] / 60:.1f} | {r['images_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf_tricks"))
    parser.add_argument("--per-class", type=int, default=1000, help="images per class and split")
    parser.add_argument("--demo", action="store_true", help="the bundled demo sample instead of --per-class")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--tta-variants", default="", help="also evaluated with --tta crops")
    parser.add_argument("--extra", nargs="*", default=[], metavar="key=value", help="overrides for every variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.work, args.per_class, args.demo)
    results = []
    for name in names:
        overrides = fixed_budget(args.epochs, args.threads) + VARIANTS[name] + args.extra
        result = run_variant(name, overrides, data_dir, args.work, name in args.tta_variants.split(","),
                             args.threads)
        results.append(result)
        with (args.work / "tricks.jsonl").open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        print(f"== {name}: test F1 {result['test_f1']:.4f} {result['test_f1_ci95']}, "
              f"{result['train_seconds']:.0f}s, {result['images_per_s']:.0f} img/s"
              + (f", TTA crops {result['tta_crops_f1']:.4f}" if "tta_crops_f1" in result else ""), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

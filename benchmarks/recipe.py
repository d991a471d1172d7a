"""Each training-recipe piece on its own, on the bundled demo sample: same config, seed and budget.

    .venv/bin/python benchmarks/recipe.py --work /tmp/imgclf_recipe [--pieces baseline mix lr_find] [key=value ...]

The bundled Fashion-MNIST sample (3,000 train / 1,000 test images, 10 classes) is stored with
`imgclf download` (from its folder), then trained with configs/demo.yaml (mobilenet_v3_small from
scratch, 30 epochs, seed 42) once per piece, and evaluated on the 1,000 test images:

    baseline   configs/demo.yaml as it is (optim.lr 0.003), evaluated with --tta none, flip and crops
               (test-time augmentation needs no retraining: the same weights, three evaluations)
    mix        + data.augment.mixup=0.8 data.augment.cutmix=1.0 (one of the two per batch, every batch)
    lr_find    optim.lr=find: the learning-rate finder's suggestion instead of 0.003

Prints test F1-macro with its 95% bootstrap interval, accuracy and training time per piece, and
writes WORK/recipe.json. Extra key=value arguments go to every training (e.g. trainer.epochs=5
for a quick look). Training time depends on what else runs on the machine; compare the scores,
and the times only within one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "imgclf" / "demo_data" / "fashion_mnist"
PIECES = {
    "baseline": [],
    "mix": ["data.augment.mixup=0.8", "data.augment.cutmix=1.0"],
    "lr_find": ["optim.lr=find"],
}


def _data(work: Path) -> Path:
    from imgclf.stages import download

    data_dir = work / "data"
    if not (data_dir / "manifest.parquet").is_file():
        download.run(download.DownloadOptions(sources=[SAMPLE], out=data_dir, show_progress=False))
    return data_dir


def _evaluate(run_dir: Path, tta: str) -> dict:
    from imgclf.stages import evaluate

    out = run_dir if tta == "none" else run_dir / f"tta-{tta}"
    m = evaluate.run(evaluate.EvaluateOptions(model=run_dir, out=out, split="test", tta=tta, progress=False))
    return {"f1_macro": m["f1_macro"], "f1_macro_ci95": m["f1_macro_ci95"], "accuracy": m["accuracy"],
            "log_loss": m["log_loss"], "predict_seconds": m["timing"]["predict_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf_recipe"))
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--pieces", nargs="+", choices=list(PIECES), default=list(PIECES))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from imgclf.config import load_config
    from imgclf.stages import train

    data_dir = _data(args.work)
    results: dict[str, dict] = {}
    for piece in args.pieces:
        config = load_config(args.config, ["trainer.progress_bar=false", *args.overrides, *PIECES[piece]])
        run_dir = args.work / piece
        t0 = time.perf_counter()
        trained = train.run(train.TrainOptions(config, data_dir, run_dir))
        row = {"train_seconds": round(time.perf_counter() - t0, 1), "epochs": trained.epochs_run,
               "optim_lr": load_config(run_dir / "config.yaml").optim.lr}
        for tta in (("none", "flip", "crops") if piece == "baseline" else ("none",)):
            row[f"tta_{tta}"] = _evaluate(run_dir, tta)
        results[piece] = row
        print(f"== {piece}: {json.dumps(row)}", flush=True)
    (args.work / "recipe.json").write_text(json.dumps({"config": str(args.config), "overrides": args.overrides,
                                                       "results": results}, indent=2))
    print(f"\n{'piece':22} {'test F1-macro [95% CI]':28} {'accuracy':>8} {'optim.lr':>9} {'train s':>8}")
    for piece, row in results.items():
        for key, m in row.items():
            if not key.startswith("tta_"):
                continue
            name = piece if key == "tta_none" else f"{piece} + tta {key.removeprefix('tta_')}"
            lo, hi = m["f1_macro_ci95"]
            print(f"{name:22} {m['f1_macro']:.3f} [{lo:.3f}, {hi:.3f}]{'':9} {m['accuracy']:8.3f} "
                  f"{row['optim_lr']:9.2g} {row['train_seconds']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

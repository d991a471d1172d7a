"""Evaluate's two input roads timed on the same images and model (issue 21 item 1).

Before: `presets.eval_transform` one image at a time in DataLoader workers, default collate.
Now: the images are decoded in the workers and preprocessed a batch at a time by predict's
preprocessor (`inference.eval_preprocessor`) in the collate. The probabilities must be bitwise
equal; the script says so and prints images/s for both, best of --repeats, alternating.

    python benchmarks/evaluate_preprocess.py [--copies 2] [--workers 0] [--repeats 3]

Images: the bundled Fashion-MNIST test images (1,000 PNGs, 28x28), `--copies` times; model: the
shipped weights/fashion_mnist_mobilenet_v3_small.pt on CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from imgclf.data import ImageFolderFrame
from imgclf.evaluate import _scoring
from imgclf.presets import eval_transform

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist"
WEIGHTS = ROOT / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


def _frame(copies: int) -> pd.DataFrame:
    paths = sorted(IMAGES.glob("test/*/*.png")) * copies
    rel = [str(p.relative_to(IMAGES)) for p in paths]
    return pd.DataFrame({"path": rel, "label": [Path(r).parts[1] for r in rel]})


def _old_road(model: _scoring.EvalModel, frame: pd.DataFrame, workers: int) -> np.ndarray:
    dataset = ImageFolderFrame(frame, IMAGES, model.class_names, eval_transform(model.handle.preprocessing),
                               skip_unreadable=True)
    with torch.inference_mode():
        return np.concatenate([model.probabilities(x) for x, _ in DataLoader(dataset, batch_size=128,
                                                                               num_workers=workers)])


def _new_road(model: _scoring.EvalModel, frame: pd.DataFrame, workers: int) -> np.ndarray:
    return _scoring.predict_proba(model, frame, IMAGES, 128, workers, progress=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = _scoring.open_model(WEIGHTS, "cpu")
    frame = _frame(args.copies)
    best = {"eval_transform per image (before)": float("inf"), "batched preprocessor (now)": float("inf")}
    out = {}
    for _ in range(args.repeats):
        for name, road in zip(best, (_old_road, _new_road), strict=True):
            t0 = time.perf_counter()
            out[name] = road(model, frame, args.workers)
            best[name] = min(best[name], time.perf_counter() - t0)
    before, now = best.values()
    print(f"{len(frame)} images, {args.workers} worker(s), torch {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:36} {seconds:6.2f} s  {len(frame) / seconds:7.0f} images/s")
    print(f"  ratio now/before (time)              {now / before:.2f}")
    a, b = out.values()
    print(f"  probabilities bitwise equal: {bool(np.array_equal(a, b))}")


if __name__ == "__main__":
    main()

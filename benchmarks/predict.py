"""Benchmark: predict throughput on CPU, PyTorch eager vs ONNX Runtime, same images, same run.

    .venv/bin/python benchmarks/predict.py                       # shipped weights if present
    .venv/bin/python benchmarks/predict.py --model RUN_DIR --images 1000 --batch-size 64

Two figures per backend:
  model only   a preprocessed batch through the network (what the exporter changes)
  end to end   `predict.predict` over image files: read, decode, eval preprocessing, model
Each is the median of --repeats timed passes after one warm-up pass. The ONNX file is
exported from the same checkpoint in this run, into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgclf import export, predict
from imgclf.inference import load_classifier
from imgclf.predict._inputs import expand_inputs

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "test"
SHIPPED = ROOT / "weights" / "fashion_mnist_mobilenet_v3_small.pt"


def _fresh_checkpoint(folder: Path) -> Path:
    """Untrained mobilenet_v3_small at 64 px with the demo's classes: same cost as trained weights."""
    from imgclf.checkpoint import make_meta, save_slim
    from imgclf.config import load_config
    from imgclf.models import create_model
    from imgclf.presets import Preprocessing

    config = load_config(None, ["model.arch=mobilenet_v3_small", "data.image_size=64"])
    classes = sorted(p.name for p in DEMO_TEST.iterdir())
    model = create_model(config.model.arch, len(classes))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = make_meta(config, classes, Preprocessing.from_config(config.data))
    return save_slim(folder / "fresh.pt", state, meta)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, ORT session arenas, lazy inits
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="run dir or checkpoint (default: shipped weights)")
    parser.add_argument("--images", type=int, default=1000, help="bundled test images to classify (max 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or (SHIPPED if SHIPPED.is_file() else _fresh_checkpoint(Path(tmp)))
        onnx_path = export.run(model_path, "onnx", Path(tmp) / "model.onnx").path
        backends = {"torch eager": load_classifier(model_path, "torch"),
                    "onnxruntime": load_classifier(onnx_path, "onnx")}
        files = sorted(DEMO_TEST.rglob("*.png"))[: args.images]
        items = expand_inputs([str(f) for f in files])
        pre = backends["torch eager"].preprocessing
        options = predict.PredictOptions(batch_size=args.batch_size, progress=False)
        # Real preprocessed images, not random numbers: random inputs can drive untrained weights into
        # denormal floats, which are many times slower on CPU and would measure the wrong thing.
        from imgclf.images import open_image_file

        first = backends["torch eager"]
        batch = [first.prepare(open_image_file(str(f))) for f in files[: args.batch_size]]
        n_batches = max(1, len(files) // args.batch_size)

        rows = []
        for name, classifier in backends.items():
            model_s = _median_seconds(lambda c=classifier: [c.probabilities(batch) for _ in range(n_batches)],
                                      args.repeats)
            e2e_s = _median_seconds(lambda c=classifier: list(predict.predict(items, c, options)),
                                    args.repeats)
            rows.append((name, n_batches * args.batch_size / model_s, len(files) / e2e_s))

        # Same images, both backends: the answers must agree for the comparison to mean anything.
        top = [[p.top[0][0] for p in predict.predict(items, c, options)] for c in backends.values()]
        agree = float(np.mean([a == b for a, b in zip(*top, strict=True)]))

    shown = model_path.relative_to(ROOT) if model_path == SHIPPED else (args.model or "untrained, same arch")
    print(f"model: {shown}, input {pre.image_size}px, batch {args.batch_size}, {len(files)} images")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print(f"top-1 agreement torch vs onnx: {agree:.1%}\n")
    print("| backend | model only (images/s) | end to end (images/s) |")
    print("|---|---:|---:|")
    for name, model_ips, e2e_ips in rows:
        print(f"| {name} | {model_ips:,.0f} | {e2e_ips:,.0f} |")
    base_model, base_e2e = rows[0][1], rows[0][2]
    print(f"| ratio onnxruntime / torch | {rows[1][1] / base_model:.2f}x | {rows[1][2] / base_e2e:.2f}x |")


if __name__ == "__main__":
    main()

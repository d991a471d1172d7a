"""Benchmark: `imgclf export --quantize int8` on the shipped weights, fp32 vs int8 onnxruntime.

    .venv/bin/python benchmarks/quantize.py                         # both shipped models
    .venv/bin/python benchmarks/quantize.py --work /tmp/imgclf_quant --train-per-class 100 --profile

1. Fashion-MNIST as a data directory (Debian package dataset-fashion-mnist, idx files under
   /usr/share/datasets/fashion-mnist): all 10,000 test images and --train-per-class training
   images as PNG files, stored by `imgclf download FOLDER` into WORK/data (reused when present);
2. per shipped model, `export.run(export.ExportOptions(..., quantize="int8"))` with that directory as calibration data
   (calibration images sampled from train, the parity report on the held-out test split: top-1
   agreement int8 vs fp32, and F1-macro of both against the labels);
3. throughput: the same 64 preprocessed test images through the fp32 and the int8 file, as
   `imgclf predict` runs them (`inference.OnnxBackend`), rounds alternating fp32/int8 so both see
   the same machine state; median images/s and the ratio;
4. --profile: onnxruntime's per-op profile of both files (ms per batch of 64 by op type), which
   shows where int8 wins and where it does not.
The machine may be shared: compare the ratio within a run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fashion_mnist import CLASSES, FILES, RAW_DIR, read_idx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "weights").glob("*.pt"))


def write_pngs(raw: Path, root: Path, train_per_class: int) -> None:
    """WORK/images/{train,test}/<class>/*.png: all test images, the first N training images of each class."""
    for split, (images_name, labels_name, prefix) in FILES.items():
        images, labels = read_idx(raw / images_name), read_idx(raw / labels_name)
        taken = collections.Counter()
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            if split == "train" and taken[int(label)] >= train_per_class:
                continue
            taken[int(label)] += 1
            path = root / split / CLASSES[label] / f"{prefix}_{i:05d}.png"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(path, format="PNG")


def data_dir(work: Path, raw: Path, train_per_class: int) -> Path:
    data = work / "data"
    if not (data / "manifest.parquet").is_file():
        write_pngs(raw, work / "images", train_per_class)
        subprocess.run([sys.executable, "-m", "imgclf", "download", str(work / "images"), "--out", str(data),
                        "--no-progress", "-q"], check=True)
    return data


def _batch(onnx_path: Path, n: int = 64) -> np.ndarray:
    from imgclf.images import open_image_file
    from imgclf.inference import load_classifier

    test = sorted((ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "test").rglob("*.png"))
    classifier = load_classifier(onnx_path, "onnx")
    return classifier.prepare_batch([open_image_file(str(p)) for p in test[:: max(1, len(test) // n)][:n]])


def throughput(fp32: Path, int8: Path, rounds: int, passes: int) -> tuple[float, float]:
    """Median images/s of fp32 and int8 at batch 64, rounds alternating between the two."""
    from imgclf.inference import OnnxBackend

    batch = _batch(fp32)
    backends = {"fp32": OnnxBackend(fp32), "int8": OnnxBackend(int8)}
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for backend in backends.values():
        backend.probabilities(batch)  # warm-up: arenas, kernels' packed weights
    for _ in range(rounds):
        for name, backend in backends.items():
            start = time.perf_counter()
            for _ in range(passes):
                backend.probabilities(batch)
            seconds[name].append(time.perf_counter() - start)
    return tuple(passes * len(batch) / statistics.median(seconds[name]) for name in ("fp32", "int8"))


def profile(path: Path, batch: np.ndarray, runs: int = 10) -> dict[str, float]:
    """ms per batch by op type, from onnxruntime's own profiler (kernel time only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "imgclf_quant_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"input": batch})
    trace = Path(session.end_profiling())
    per_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    trace.unlink()
    return dict(per_op.most_common())


def _print_profile(name: str, fp32: dict[str, float], int8: dict[str, float]) -> None:
    print(f"\nper-op profile, {name}, ms per batch of 64 (onnxruntime kernel time; fp32 total "
          f"{sum(fp32.values()):.1f}, int8 total {sum(int8.values()):.1f}):\n")
    print("| fp32 op | ms | int8 op | ms |\n|---|---:|---|---:|")
    a, b = list(fp32.items()), list(int8.items())
    for i in range(max(len(a), len(b))):
        left = f"{a[i][0]} | {a[i][1]:.2f}" if i < len(a) else " | "
        right = f"{b[i][0]} | {b[i][1]:.2f}" if i < len(b) else " | "
        print(f"| {left} | {right} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgclf_quant"))
    parser.add_argument("--raw", type=Path, default=RAW_DIR)
    parser.add_argument("--train-per-class", type=int, default=100, help="training images stored (calibration pool)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--held-out-images", type=int, default=10000, help="test images for the parity report")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=10, help="batches per timed round")
    parser.add_argument("--profile", action="store_true", help="also print onnxruntime's per-op profile")
    parser.add_argument("models", nargs="*", type=Path, default=SHIPPED)
    args = parser.parse_args()

    import onnxruntime as ort

    from imgclf.stages import export

    data = data_dir(args.work, args.raw, args.train_per_class)
    print(f"data: {data}; {os.cpu_count()} CPU cores, onnxruntime {ort.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the start (other processes share the cores)\n", flush=True)
    rows, profiles = [], []
    options = export.QuantizeOptions(data, args.calibration_images, args.held_out_images)
    for model in args.models:
        out = args.work / "models"
        fp32 = export.run(export.ExportOptions(model, "onnx", out / f"{model.stem}.onnx")).path
        t0 = time.perf_counter()
        result = export.run(export.ExportOptions(model, "onnx", out / f"{model.stem}.int8.onnx", "int8", options))
        q = result.quantization
        print(f"{model.name}: {q.method}; held out: {q.held_out}; export + quantise + judge "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        fp32_ips, int8_ips = throughput(fp32, result.path, args.rounds, args.passes)
        rows.append((model.name, fp32_ips, int8_ips, q, fp32.stat().st_size, result.path.stat().st_size))
        if args.profile:
            batch = _batch(fp32)
            profiles.append((model.name, profile(fp32, batch), profile(result.path, batch)))

    print(f"\nbatch 64, median of {args.rounds} alternating rounds of {args.passes} batches "
          f"(load average {os.getloadavg()[0]:.1f} at the end):\n")
    print("| model | fp32 images/s | int8 images/s | int8 / fp32 | top-1 agreement | F1-macro fp32 | "
          "F1-macro int8 | F1 change (points) | file fp32 / int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fp32_ips, int8_ips, q, size32, size8 in rows:
        print(f"| {name} | {fp32_ips:,.0f} | {int8_ips:,.0f} | **{int8_ips / fp32_ips:.2f}x** | "
              f"{q.top1_agreement:.2%} | {q.f1_fp32:.4f} | {q.f1_int8:.4f} | {100 * q.f1_change:+.2f} | "
              f"{size32 / 2**20:.1f} / {size8 / 2**20:.1f} MiB |")
    for name, fp32_prof, int8_prof in profiles:
        _print_profile(name, fp32_prof, int8_prof)


if __name__ == "__main__":
    main()

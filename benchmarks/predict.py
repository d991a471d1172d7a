"""Benchmark: predict throughput on CPU, PyTorch eager vs ONNX Runtime, and one-image start-up.

    .venv/bin/python benchmarks/predict.py                         # shipped weights if present
    .venv/bin/python benchmarks/predict.py --baseline-src /tmp/old/src   # also the code in that tree
    .venv/bin/python benchmarks/predict.py --model RUN_DIR --images 1000 --batch-size 64

Throughput, per backend, on the same images in the same run:
  model only   a preprocessed batch through the network (what the backend costs)
  end to end   `predict.predict` over the image files: read, decode, preprocess, model, top-k
  ratio        end to end / model only: 1.0 would mean reading and preprocessing cost nothing
Each is the median of --repeats timed passes after one warm-up pass. The ONNX file is exported
from the same checkpoint in this run, into a temporary folder.

Start-up: `imgclf predict --model model.onnx one.png` (and the checkpoint, for comparison) in a
fresh process, wall time and peak RSS, median of --starts runs.

--cli N: the command line as a user runs it, `imgclf predict --model model.onnx FOLDER -o out.csv`
on N PNG files (the bundled test PNGs copied N/1000 times into a temporary folder), start-up
subtracted (the same command on one image), against a bare onnxruntime session (default options)
on batches of the same preprocessed 64 images, in the same run, rounds alternating; prints the
ratio CLI / model only (issue 23's goal: >= 0.6).

With --baseline-src (e.g. `git archive <commit> src | tar -x -C /tmp/old`), every figure is also
measured with that source tree, in child processes of this run, so before/after come from the
same machine state. The machine may be shared: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = ROOT / "src" / "imgclf" / "demo_data" / "fashion_mnist" / "test"
SHIPPED = ROOT / "weights" / "fashion_mnist_mobilenet_v3_small.pt"
BACKENDS = (("torch eager", "torch"), ("onnxruntime", "onnx"))
_PEAK = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
         "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
         "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, ORT session arenas, lazy inits
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(models: dict[str, str], n_images: int, batch_size: int, repeats: int) -> dict:
    """Model-only and end-to-end images/s per backend, with APIs that old and new trees share."""
    from imgclf.images import open_image_file
    from imgclf.inference import load_classifier
    from imgclf.predict._inputs import expand_inputs
    from imgclf.stages import predict

    files = sorted(DEMO_TEST.rglob("*.png"))[:n_images]
    items = list(expand_inputs([str(f) for f in files]))
    options = predict.PredictOptions(batch_size=batch_size, progress=False)
    out: dict = {"rows": {}}
    top1 = {}
    for name, backend in BACKENDS:
        classifier = load_classifier(models[backend], backend)
        # Real preprocessed images, not random numbers: random inputs can drive untrained weights into
        # denormal floats, which are many times slower on CPU and would measure the wrong thing.
        batch = [classifier.prepare(open_image_file(str(f))) for f in files[:batch_size]]
        n_batches = max(1, len(files) // batch_size)
        model_s = _median_seconds(lambda c=classifier, b=batch, n=n_batches: [c.probabilities(b) for _ in range(n)],
                                  repeats)
        e2e_s = _median_seconds(lambda c=classifier: list(predict.predict(items, c, options)), repeats)
        out["rows"][name] = (n_batches * batch_size / model_s, len(files) / e2e_s)
        top1[name] = [p.top[0][0] for p in predict.predict(items, classifier, options)]
    # Same images, both backends: the answers must agree for the comparison to mean anything.
    out["agree"] = float(np.mean([a == b for a, b in zip(*top1.values(), strict=True)]))
    out["size"] = classifier.preprocessing.image_size
    import torch

    out["torch"] = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    return out


def _child(src: str | None, args: list[str]) -> dict:
    """This script's --measure in a fresh process, optionally with another source tree first on the path."""
    env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measuring {src or 'this tree'} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_up(model: str, image: str, src: str | None, starts: int) -> tuple[float, float]:
    """Median wall seconds and max peak RSS (MiB) of `imgclf predict --model MODEL IMAGE` in a fresh process."""
    env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
    command = [sys.executable, "-m", "imgclf", "predict", "--model", model, image, "--no-progress"]
    runs = []
    for _ in range(starts):
        done = subprocess.run([sys.executable, "-c", _PEAK, *command], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        seconds, kb = done.stdout.split()
        runs.append((float(seconds), int(kb) / 1024))
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _wall(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a child process."""
    start, cpu = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cpu


def _bare_session(onnx_path: str, n_images: int, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU seconds an image) of a bare onnxruntime session (default options) over n_images."""
    import onnxruntime as ort

    from imgclf.images import open_image_file
    from imgclf.inference import load_classifier

    files = sorted(DEMO_TEST.rglob("*.png"))[:batch_size]
    batch = load_classifier(onnx_path, "onnx").prepare_batch([open_image_file(str(f)) for f in files])
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    session.run(None, {"input": batch})  # warm-up
    n_batches = max(1, n_images // batch_size)
    start, cpu = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    for _ in range(n_batches):
        session.run(["probabilities"], {"input": batch})
    n = n_batches * batch_size
    return n / (time.perf_counter() - start), (_cpu(resource.RUSAGE_SELF) - cpu) / n


def _png_folder(folder: Path, n_images: int) -> Path:
    """N distinct PNG files in 10 class folders: copies of the bundled test PNGs."""
    pngs = sorted(DEMO_TEST.rglob("*.png"))
    for i in range(n_images):
        src_png = pngs[i % len(pngs)]
        dest = folder / src_png.parent.name / f"{i:06d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src_png.read_bytes())
    return folder


def cli_vs_model(onnx_path: str, n_images: int, rounds: int,
                 trees: list[tuple[str, str | None]]) -> dict[str, list[tuple[float, ...]]]:
    """Per tree, per round: (CLI images/s with start-up subtracted, its CPU s an image, bare session
    images/s, its CPU s an image), the trees and the bare session measured back to back in each round
    so they share the machine's state."""
    results: dict[str, list[tuple[float, ...]]] = {label: [] for label, _ in trees}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _png_folder(Path(tmp) / "images", n_images)
        one, out = str(next(folder.rglob("*.png"))), str(Path(tmp) / "out.csv")
        for _ in range(rounds):
            for label, src in trees:
                env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
                base = [sys.executable, "-m", "imgclf", "predict", "--model", onnx_path, "--no-progress", "-o", out]
                _wall([*base, one], env)  # warm the page cache and the interpreter's files
                (start_up, start_cpu), (many, many_cpu) = _wall([*base, one], env), _wall([*base, str(folder)], env)
                with open(out) as fh:
                    rows = sum(1 for _ in fh) - 1
                if rows != n_images:
                    raise SystemExit(f"predict wrote {rows} rows for {n_images} images")
                results[label].append((n_images / (many - start_up), (many_cpu - start_cpu) / n_images,
                                       *_bare_session(onnx_path, n_images, 64)))
    return results


def _print_cli(results: dict[str, list[tuple[float, ...]]], n_images: int) -> None:
    print(f"\n`imgclf predict --model model.onnx FOLDER -o out.csv --no-progress`, {n_images:,} PNG files, "
          f"start-up subtracted (the same command on one of them), vs a bare onnxruntime session (default "
          f"options) at batch 64 right after it (load average {os.getloadavg()[0]:.1f} at the end):\n")
    print("| code | round | CLI (images/s) | model only (images/s) | CLI / model only | CPU us an image: "
          "CLI / model only |\n|---|---|---:|---:|---:|---:|")
    for label, rows in results.items():
        for i, (cli, cli_cpu, model, model_cpu) in enumerate(rows, 1):
            print(f"| {label} | {i} | {cli:,.0f} | {model:,.0f} | {cli / model:.2f} | "
                  f"{cli_cpu * 1e6:.0f} / {model_cpu * 1e6:.0f} |")
    for label, rows in results.items():
        ratios = [row[0] / row[2] for row in rows]
        cpu = statistics.median(row[1] for row in rows) * 1e6
        print(f"| {label} | median | | | **{statistics.median(ratios):.2f}** | {cpu:.0f} |", flush=True)


def _print_throughput(label: str, result: dict) -> None:
    print(f"\n{label}: input {result['size']}px, {result['torch']}, top-1 agreement torch vs onnx "
          f"{result['agree']:.1%}, load average {os.getloadavg()[0]:.1f}\n")
    print("| backend | model only (images/s) | end to end (images/s) | end to end / model only |")
    print("|---|---:|---:|---:|")
    for name, (model_ips, e2e_ips) in result["rows"].items():
        print(f"| {name} | {model_ips:,.0f} | {e2e_ips:,.0f} | {e2e_ips / model_ips:.2f} |")
    (tm, te), (om, oe) = result["rows"]["torch eager"], result["rows"]["onnxruntime"]
    print(f"| ratio onnxruntime / torch | {om / tm:.2f}x | {oe / te:.2f}x | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="run dir or checkpoint (default: shipped weights)")
    parser.add_argument("--images", type=int, default=1000, help="bundled test images to classify (max 1000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--starts", type=int, default=5, help="one-image start-up runs per figure")
    parser.add_argument("--baseline-src", default=None, help="also measure the source tree in this folder")
    parser.add_argument("--cli", type=int, default=0, metavar="N",
                        help="only time the command line on N PNG files against a bare onnxruntime session")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # JSON {torch, onnx}: child mode
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(throughput(json.loads(args.measure), args.images, args.batch_size, args.repeats)))
        return

    from imgclf.stages import export

    model = args.model or SHIPPED
    trees = ([("before", str(Path(args.baseline_src).resolve()))] if args.baseline_src else []) + [("now", None)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export.run(export.ExportOptions(model, "onnx", Path(tmp) / "model.onnx")).path
        models = {"torch": str(model), "onnx": str(onnx_path)}
        image = str(sorted(DEMO_TEST.rglob("*.png"))[0])
        print(f"model: {model}, batch {args.batch_size}, {args.images} images; {platform.machine()}, "
              f"{os.cpu_count()} CPU cores, load average {load_before[0]:.1f} at the start "
              "(other processes share the cores)", flush=True)
        if args.cli:
            _print_cli(cli_vs_model(str(onnx_path), args.cli, args.repeats, trees), args.cli)
            return
        measure = ["--measure", json.dumps(models), "--images", str(args.images), "--batch-size",
                   str(args.batch_size), "--repeats", str(args.repeats)]
        for label, src in trees:
            _print_throughput(f"code: {label}", _child(src, measure))
        starts = {(label, kind): start_up(models[kind], image, src, args.starts)
                  for label, src in trees for kind in ("onnx", "torch")}

    print(f"\n`imgclf predict --model MODEL one.png`, fresh process each run "
          f"(load average {os.getloadavg()[0]:.1f}):\n")
    print("| code | model | wall time (median) | peak RSS (max) |")
    print("|---|---|---:|---:|")
    for (label, kind), (seconds, mib) in starts.items():
        print(f"| {label} | {'model.onnx' if kind == 'onnx' else 'checkpoint'} | {seconds:.2f} s | {mib:.0f} MiB |")


if __name__ == "__main__":
    main()

"""`imgclf demo`: the whole pipeline, offline, on the bundled Fashion-MNIST sample.

1. serve the bundled PNGs (and a few broken links) from a local HTTP server on 127.0.0.1,
2. download them through the real downloader (validating, de-duplicating, accounting),
3. train mobilenet_v3_small with configs/demo.yaml,
4. evaluate on the test split against the baselines and write plots and report.html.

Everything lands under --out (default ./demo_output); nothing is fetched from the internet.
"""

from __future__ import annotations

import time
from pathlib import Path

from imgclf.csvfile import RowWriter
from imgclf.errors import DataError

SAMPLE_ROOT = Path(__file__).resolve().parent / "demo_data"
# The configs ship inside the package (the repo's configs/ links here), so the demo also runs
# from a plain `pip install` and in the Docker image.
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"

# The broken links a real scraped list has: what the downloader must account for, not crash on.
BROKEN_LINKS = (
    ("missing/product_4711.png", "Bag"),        # 404
    ("broken/removed.html", "Coat"),            # an HTML page served with 200
    ("broken/truncated.png", "Sneaker"),        # a truncated PNG
)


def write_sources(base_url: str, out_dir: Path, limit: int | None = None) -> list[Path]:
    """Write train.csv and test.csv (url,label) listing the bundled images; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "test"):
        path = out_dir / f"{split}.csv"
        with path.open("w", newline="") as fh:
            writer = RowWriter(fh)
            writer.writerow(["url", "label"])
            for class_dir in sorted((SAMPLE_ROOT / "fashion_mnist" / split).iterdir()):
                for image in sorted(class_dir.glob("*.png"))[:limit]:
                    rel = image.relative_to(SAMPLE_ROOT).as_posix()
                    writer.writerow([f"{base_url}/{rel}", class_dir.name])
            if split == "train":
                for rel, label in BROKEN_LINKS:
                    writer.writerow([f"{base_url}/{rel}", label])
        paths.append(path)
    return paths


def _fresh_run_dir(out: Path) -> Path:
    """A new run directory each time: a second demo never overwrites the first one's results."""
    run_dir = out / "run"
    n = 2
    while run_dir.exists():
        run_dir = out / f"run-{n}"
        n += 1
    return run_dir


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run(out: Path, seed: int = 42, overrides: list[str] | None = None, limit: int | None = None,
        show_progress: bool = True) -> int:
    """Run download -> train -> evaluate; `limit` keeps that many images per class and split."""
    from imgclf._localserver import LocalServer
    from imgclf.config import load_config
    from imgclf.stages import download, evaluate, train

    if not DEMO_CONFIG.is_file():
        raise DataError(f"{DEMO_CONFIG}: demo config missing from the installed package")
    out = Path(out)
    data_dir, run_dir = out / "data", _fresh_run_dir(out)
    quiet = [] if show_progress else ["trainer.progress_bar=false"]
    config = load_config(DEMO_CONFIG, [f"seed={seed}", *quiet, *(overrides or [])])
    timings: dict[str, float] = {}

    with LocalServer(SAMPLE_ROOT) as server:
        sources = write_sources(server.base_url, out / "sources", limit)
        t0 = _stage(f"download: {server.base_url} -> {data_dir}")
        download.run(download.DownloadOptions(sources=tuple(sources), out=data_dir, show_progress=show_progress))
        timings["download"] = time.perf_counter() - t0

    t0 = _stage(f"train: {config.model.arch}, {config.trainer.epochs} epochs -> {run_dir}")
    train.run(train.TrainOptions(config, data_dir, run_dir))
    timings["train"] = time.perf_counter() - t0

    t0 = _stage("evaluate: test split")
    evaluated = evaluate.run(evaluate.EvaluateOptions(model=run_dir, data=data_dir, split="test", seed=seed,
                                                      progress=show_progress))
    timings["evaluate"] = time.perf_counter() - t0

    print("\n== demo summary")
    print(evaluated.summary())
    print("\ntime per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f" (total {sum(timings.values()):.0f}s)")
    # The summary above already lists report.html, the confusion matrix and metrics.json.
    print(f"run directory:     {run_dir}")
    print(f"training curves:   {run_dir / 'curves.png'}")
    return 0

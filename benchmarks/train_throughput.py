"""Training images/s through the real data loader vs synthetic tensors (the model-only ceiling).

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--steps 30]
        [--workers 0 1 2] [--cache on off]

Builds a data directory from the bundled Fashion-MNIST sample (3,000 real PNG files), then, for
each loader setting, times the same training step (normalise, forward, loss, backward, AdamW)
fed by (a) train's real DataLoader (decode in workers, uint8, augmentation, optional RAM cache)
and (b) a fixed uint8 batch of the same shape already in memory. Rounds alternate a/b so that
load from other processes hits both alike; the ratio a/b is the figure (goal >= 0.90 on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir(dest: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import CLASSES, make_data_dir  # the test helper: a DATA_DIR without HTTP

    return make_data_dir(dest, CLASSES, n_train=300, n_test=0)


def _steps(module, batches: Iterator, steps: int) -> float:
    """Images/s over `steps` training steps fed by `batches`."""
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    module.train()
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = module.criterion(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += len(y)
    return images / (time.perf_counter() - start)


def _forever(loader) -> Iterator:
    while True:
        yield from loader


def _synthetic(batch: tuple[torch.Tensor, torch.Tensor]) -> Iterator:
    while True:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", choices=("on", "off"), nargs="+", default=["on", "off"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from imgclf import data, models, presets
    from imgclf.config import load_config
    from imgclf.stages import train
    from imgclf.train import _inputs as train_inputs
    from imgclf.train._module import ImageClassifier

    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, config {args.config.name}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _data_dir(Path(tmp) / "data")
        for cache in args.cache:
            for workers in args.workers:
                config = load_config(args.config, [*args.overrides, f"data.num_workers={workers}",
                                                   f"data.cache={'true' if cache == 'on' else 'false'}"])
                train._set_cpu_threads(config)  # as train.run: cores minus loader workers
                split = data.make_split(data_dir, config.data.val_fraction, config.seed)
                names = data.class_names_of(split)
                pre = presets.Preprocessing.from_config(config.data)
                torch.manual_seed(0)
                model = models.create_model(config.model.arch, len(names))
                module = ImageClassifier(model, config, names, pre)
                loader, _ = train_inputs.loaders(config, split, data_dir, names, pre)
                batches = _forever(loader)
                x, y = next(batches)
                fixed = (torch.randint(0, 256, x.shape, dtype=torch.uint8), y.clone())
                _steps(module, batches, 3)  # warm up both paths (allocator, worker start-up)
                _steps(module, _synthetic(fixed), 3)
                real, synth = [], []
                for _ in range(args.rounds):
                    real.append(_steps(module, batches, args.steps))
                    synth.append(_steps(module, _synthetic(fixed), args.steps))
                r, s = statistics.median(real), statistics.median(synth)
                print(f"cache {cache:3s} workers {workers} threads {torch.get_num_threads()}: "
                      f"loader {r:7.1f} img/s, synthetic {s:7.1f} img/s, "
                      f"ratio {r / s:.2f}  (batch {len(y)} of {tuple(x.shape[1:])} uint8)", flush=True)
                del loader, batches
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parameters and CPU training / inference speed of each architecture `model.arch` accepts.

    .venv/bin/python benchmarks/models.py [--size 64] [--threads 2] [--archs mobilenet_v3_small timm/resnet18]

For each architecture (10 classes, random init): one training step (forward, cross-entropy,
backward, AdamW) on a fixed random batch of --batch images, and inference (eval mode,
inference_mode) on a batch of 2x that, both channels_last as training and predict feed them
on CPU; the median of --steps timed steps after 2 warm-up steps, in images per second.
Prints a table, and the `MEASURED` literal that src/imgclf/models.py holds for `imgclf models`
(figures are measured once, here, never at run time). Timing on a machine other jobs share is
noisy: each architecture is measured in --rounds rounds, alternating, and the best round kept.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from torch import nn

from imgclf.models import ARCHITECTURES, create_model, fast_layout


def _median_seconds(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(arch: str, size: int, batch: int, steps: int, small_input: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(arch, 10, small_input=small_input)
    params = sum(p.numel() for p in model.parameters())
    x = fast_layout(torch.randn(batch, 3, size, size))
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = batch / _median_seconds(train_step, steps)
    model.eval()
    xi = fast_layout(torch.randn(batch * 2, 3, size, size))

    def infer_step() -> None:
        with torch.inference_mode():
            model(xi)

    infer = 2 * batch / _median_seconds(infer_step, steps)
    return {"params": params, "train": train, "infer": infer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small-input", action="store_true", help="model.small_input=true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for arch in args.archs:
            got = measure(arch, args.size, args.batch, args.steps, args.small_input)
            old = best.get(arch)
            best[arch] = got if old is None else {k: max(old[k], got[k]) for k in got}
            print(f"  {arch}: train {got['train']:.0f} img/s, infer {got['infer']:.0f} img/s", flush=True)
    print(f"\n{args.size} px, batch {args.batch} (inference {2 * args.batch}), {args.threads} threads, channels_last, "
          f"torch {torch.__version__}, {platform.machine()}, best of {args.rounds} rounds")
    print(f"{'architecture':24} {'params':>8} {'train img/s':>12} {'infer img/s':>12}")
    for arch, got in best.items():
        print(f"{arch:24} {got['params'] / 1e6:7.2f}M {got['train']:12.0f} {got['infer']:12.0f}")
    print("\nMEASURED = {")
    for arch, got in best.items():
        print(f'    "{arch}": ({got["params"]:.0f}, {got["train"]:.0f}, {got["infer"]:.0f}),')
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

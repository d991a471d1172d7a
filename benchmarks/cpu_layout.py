"""Training step speed on CPU by memory layout (NCHW vs channels_last), precision and compile.

    .venv/bin/python benchmarks/cpu_layout.py [--archs mobilenet_v3_small resnet18 efficientnet_b0]
        [--size 64] [--batch 128] [--steps 15] [--bf16] [--compile] [--fused]
    .venv/bin/python benchmarks/cpu_layout.py --config configs/fashion_mnist_resnet18_half.yaml --bf16 --fused

Why: `trainer.channels_last: auto` turns NHWC on for CPU training as well as CUDA; this prints
the figures behind that default. --config times the model a training config builds (arch,
timm_kwargs, small_input) at its image_size instead of --archs/--size. Each row times the same
step (forward, cross-entropy, backward, AdamW) on a fixed random batch in memory, so it measures
the model alone, not the loader.
Run it on an idle machine: both cores train.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, NamedTuple

import torch


class ModelSpec(NamedTuple):
    arch: str
    small_input: bool = False
    timm_kwargs: dict[str, Any] | None = None


def _images_per_s(model_spec: ModelSpec, size: int, batch: int, steps: int, channels_last: bool, bf16: bool,
                  compile_: bool, fused: bool) -> tuple[float, float]:
    from imgclf.models import create_model

    torch.manual_seed(0)
    model = create_model(model_spec.arch, 10, small_input=model_spec.small_input, timm_kwargs=model_spec.timm_kwargs)
    # fused=None is torch's default (its per-tensor loop on CPU); training uses fused=True (train/_module.py).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if fused else None)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if channels_last:  # as _lightning.ImageClassifier._prepare: the batch only, not the weights
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_ else model
    net.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(3):  # warm-up: allocator, oneDNN primitive cache, compilation
        step()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start), warmup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    parser.add_argument("--fused", action="store_true",
                        help="also time the last variant with AdamW's fused step (the training default)")
    parser.add_argument("--config", help="time the model of this training config at its image_size")
    args = parser.parse_args(argv)
    specs, size = [ModelSpec(arch) for arch in args.archs], args.size
    if args.config:
        from imgclf.config import load_config

        config = load_config(args.config)
        specs = [ModelSpec(config.model.arch, config.model.small_input, config.model.timm_kwargs or None)]
        size = config.data.image_size
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {size}px, batch {args.batch}")
    variants = [("NCHW fp32", False, False, False, False), ("channels_last fp32", True, False, False, False)]
    if args.bf16:
        variants.append(("channels_last bf16", True, True, False, False))
    if args.compile:
        variants.append(("channels_last compile", True, False, True, False))
    if args.fused:
        name, channels_last, bf16, compile_, _ = variants[-1]
        variants.append((name + " fused", channels_last, bf16, compile_, True))
    for spec in specs:
        base = None
        for name, channels_last, bf16, compile_, fused in variants:
            speed, warmup = _images_per_s(spec, size, args.batch, args.steps, channels_last, bf16, compile_, fused)
            base = base or speed
            print(f"{spec.arch:20s} {name:28s} {speed:7.1f} img/s  x{speed / base:.2f}  (warm-up {warmup:.1f}s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

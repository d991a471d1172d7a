"""`imgclf models`: the architectures `model.arch` accepts, with their size and measured CPU speed.

The figures are measured once by benchmarks/models.py and stored in imgclf.models (MEASURED);
nothing is timed when the command runs.
"""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the architectures for model.arch, with parameters and CPU speed",
                       description="List the architectures `model.arch` accepts: parameters (10-class head) and "
                                   "training / inference images per second measured on CPU at 64 px "
                                   "(benchmarks/models.py; figures stored, not timed now). Any timm model "
                                   "works too, as timm/<name>.")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    print(table())
    return 0


def table() -> str:
    from imgclf.models import ARCHITECTURES, MEASURED, MEASURED_ON

    lines = [f"{'model.arch':22} {'parameters':>11} {'train img/s':>12} {'infer img/s':>12}"]
    for arch in ARCHITECTURES:
        params, train, infer = MEASURED.get(arch, (0, 0.0, 0.0))
        figures = (f"{params / 1e6:10.1f}M {train:12.0f} {infer:12.0f}" if params
                   else f"{'-':>11} {'-':>12} {'-':>12}")
        lines.append(f"{arch:22} {figures}")
    lines += [
        "timm/<name>            any timm model (pip install 'imgclf[timm]'), e.g. timm/resnet18d, "
        "timm/efficientnet_b0;",
        "                       not measured here: benchmarks/models.py --archs timm/<name> measures one",
        "",
        f"CPU, 64 px, channels_last, 2 threads; train: batch 64, one AdamW step; infer: batch 128. {MEASURED_ON}.",
        "model.small_input=true (torchvision archs, timm ResNets) costs about as much as a 2x image_size.",
    ]
    return "\n".join(lines)

"""`imgclf evaluate`: arguments and the call into the evaluate stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.cli._common import add_model_argument, add_renamed, one_model
from imgclf.storage import location


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics, baselines, plots and an HTML report for a model",
                       description="Evaluate a model (a run directory, a checkpoint such as the shipped weights, "
                                   "or an exported .onnx/TorchScript file) on a split of a data directory.")
    add_model_argument(p, "evaluate")
    add_renamed(p, "evaluate", "--weights", dest="model_old", type=Path)
    p.add_argument("--data", type=location, default=None,
                   help="data directory, a folder or an s3://... URL (default: the run's)")
    p.add_argument("--split", default="test", help="split to evaluate (default test; falls back to val)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write into (default: the run directory; for a model file: "
                        "DATA_DIR/evaluations/<model file stem>-<split>)")
    p.add_argument("--seed", type=int, default=0, help="seed for bootstrap and baseline simulation")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-decoding worker processes (default: the run config's data.num_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--tta", choices=("none", "flip", "crops"), default="none",
                   help="test-time augmentation: average the probabilities of the image and its mirror image "
                        "(flip, 2 passes) or also of 4 shifted crops (crops, 10 passes); recorded in metrics.json")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="a data directory whose manifest is parts: evaluate a seeded sample of about N images "
                        "of the split (needed above 2,000,000; see docs/scale.md)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf.stages import evaluate

    options = evaluate.EvaluateOptions(
        model=one_model(args), data=args.data, split=args.split, out=args.out, seed=args.seed,
        batch_size=args.batch_size, device=args.device, num_workers=args.num_workers, progress=not args.no_progress,
        tta=args.tta, sample=args.sample)
    print(evaluate.run(options).summary())
    return 0

"""`imgclf evaluate`: arguments and the call into the evaluate stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.storage import location


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics, baselines, plots and an HTML report for a run",
                       description="Evaluate a run (or shipped weights) on a split of a data directory.")
    p.add_argument("run_dir", nargs="?", type=Path, help="run directory written by `imgclf train`")
    p.add_argument("--weights", type=Path, default=None, help="evaluate a checkpoint file instead of a run")
    p.add_argument("--data", type=location, default=None,
                   help="data directory, a folder or an s3://... URL (default: the run's)")
    p.add_argument("--split", default="test", help="split to evaluate (default test; falls back to val)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: the run directory; with --weights: "
                        "DATA_DIR/evaluations/<weights stem>-<split>)")
    p.add_argument("--seed", type=int, default=0, help="seed for bootstrap and baseline simulation")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-decoding worker processes (default: the run config's data.num_workers)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf import evaluate

    if args.run_dir is None and args.weights is None:
        raise ImgclfError("evaluate: give a RUN_DIR or --weights FILE")
    metrics = evaluate.run(evaluate.EvaluateOptions.from_namespace(args))
    print(evaluate.format_summary(metrics))
    return 0

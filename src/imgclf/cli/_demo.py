"""`imgclf demo`: arguments and the call into the demo stage."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline offline on the bundled Fashion-MNIST sample")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for data and run")
    p.add_argument("--seed", type=int, default=42, help="seeds the split, training and the report's bootstrap")
    p.add_argument("--limit", type=int, default=None,
                   help="use at most N images per class and split (a quick look; default: all 4,000)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. trainer.epochs=1)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf import demo

    return demo.run(args.out, seed=args.seed, overrides=list(args.overrides), limit=args.limit,
                    show_progress=not args.no_progress)

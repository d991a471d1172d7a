"""`imgclf train`: arguments and the call into the train stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.storage import location


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier from a config into a run directory",
                       description="Train from a YAML config on a downloaded data directory. "
                                   "Extra key=value arguments override config keys (trainer.epochs=3).")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", required=True, type=location,
                   help="data directory written by `imgclf download` (a folder or an s3://... URL)")
    p.add_argument("--out", required=True, type=Path, help="run directory to create (or resume)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt "
                                                          "(with RUN_DIR/config.yaml unless --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf.config import load_config

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config_path = args.config
    if config_path is None and args.resume and (args.out / "config.yaml").is_file():
        config_path = args.out / "config.yaml"  # resume continues with the run's own config
    config = load_config(config_path, overrides)  # before importing torch: config errors answer fast
    from imgclf import train

    train.run(config, args.data, args.out, resume=args.resume)
    return 0

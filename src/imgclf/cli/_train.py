"""`imgclf train`: arguments and the call into the train stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.rundir import RunDir
from imgclf.storage import location

CONFIG_EPILOG = """config keys:
  Every key, its default and its meaning: configs/default.yaml (print it with `imgclf config --documented`).
  Sections: seed, model.*, data.* (data.augment.*), optim.*, loss.*, trainer.*
  See the resolved config (defaults + --config FILE + key=value overrides): imgclf config --config FILE key=value ...
  Architectures for model.arch: imgclf models
"""


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier from a config into a run directory",
                       description="Train from a YAML config on a data directory made by `imgclf download` "
                                   "(or on an image folder or archive, ingested for you). "
                                   "Extra key=value arguments override config keys (trainer.epochs=3).",
                       epilog=CONFIG_EPILOG)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config; keys it does not set keep their defaults (default: the built-in defaults)")
    p.add_argument("--data", required=True, type=location,
                   help="data directory written by `imgclf download` (a folder or an s3://... URL), or an image "
                        "folder ([split/]label/image) or archive of one: train then runs download's ingest "
                        "into OUT_data beside --out (reused and updated by a rerun) and trains on that")
    p.add_argument("--out", required=True, type=Path, help="run directory to create (or resume)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt "
                                                          "(with RUN_DIR/config.yaml unless --config)")
    p.add_argument("--lr-find", action="store_true",
                   help="only run the learning-rate finder: write RUN_DIR/lr_find.png and lr_find.json and print "
                        "the suggested optim.lr (optim.lr=find runs it before training instead)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf.config import load_config

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config_path = args.config
    if config_path is None and args.resume and RunDir(args.out).config.is_file():
        config_path = RunDir(args.out).config  # resume continues with the run's own config
    config = load_config(config_path, overrides)  # before importing torch: config errors answer fast
    from imgclf.pipeline import data_for_training
    from imgclf.stages import train

    # An image folder or archive: download's ingest, run for you, makes the data directory.
    options = train.TrainOptions(config, data_for_training(args.data, args.out), args.out, resume=args.resume)
    if args.lr_find:
        found = train.find_lr(options)
        print(train.lr_find_summary(found, args.out))
        return 0 if found.suggestion is not None else 1
    train.run(options)  # its summary() is the stage's last log line (stderr, with the per-epoch lines)
    return 0

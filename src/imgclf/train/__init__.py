"""Train stage: a downloaded data directory + a TrainConfig -> a run directory with checkpoints.

    imgclf train --config configs/demo.yaml --data DATA_DIR --out RUN_DIR [key=value ...]
    imgclf train --data DATA_DIR --out RUN_DIR --resume      # after a crash or SIGKILL

Reads the manifest's usable rows (status ok, split train/val), makes a seeded stratified
train/val split, and trains with PyTorch Lightning. Hands on to evaluate/predict/export/serve
the run directory (see docs/train.md):

    config.yaml   resolved config            split.csv     row, path, label, subset
    run.json      data_dir, class_names, best_checkpoint, imgclf_version, best score
    checkpoints/best.ckpt, last.ckpt         (checkpoint.py contract: weights_only loadable)
    metrics.csv   one row per epoch          curves.png    loss / accuracy / F1 curves
    batch_preview.png   16 augmented training images with their labels (what the model sees)
"""

from __future__ import annotations

from imgclf.train._lr_find import LrFindResult
from imgclf.train._lr_find import summary as lr_find_summary
from imgclf.train._run import TrainOptions, TrainResult, auto_bn_momentum, start

__all__ = ["LrFindResult", "TrainOptions", "TrainResult", "auto_bn_momentum", "find_lr", "lr_find_summary", "run"]


def run(options: TrainOptions) -> TrainResult:
    """Train `options.config` on `options.data` into `options.out`; with resume, continue from
    checkpoints/last.ckpt."""
    result = start(options.config, options.data, options.out, options.resume, lr_find_only=False)
    assert isinstance(result, TrainResult)
    return result


def find_lr(options: TrainOptions) -> LrFindResult:
    """The learning-rate finder alone (`train --lr-find`): RUN_DIR/lr_find.png and lr_find.json, no training."""
    result = start(options.config, options.data, options.out, False, lr_find_only=True)
    assert isinstance(result, LrFindResult)
    return result

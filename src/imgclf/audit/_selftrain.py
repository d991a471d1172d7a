"""The embedding model when no --model is given: a short training run on the audited data itself.

No ImageNet backbone can be fetched offline, so the audit trains one with the train stage
(`train.run`, into AUDIT_DIR/embedder) on the data's train/val rows, for a short budget. Why a
short one: networks fit the clean majority of labels in their first epochs and memorise the
noisy ones only later (Arpit et al. 2017, "A closer look at memorization"), so an early model's
features place a mislabelled image near its true class; the cross-validated head then
contradicts the given label. A finished run in AUDIT_DIR/embedder is reused by a rerun.

Defaults (EMBEDDER_OVERRIDES) on top of the train defaults; any key=value the user passes wins,
e.g. `model.weights=resnet18.pth model.arch=resnet18` to start from local pretrained weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from imgclf import rundir
from imgclf.auditdir import EMBEDDER
from imgclf.config import TrainConfig, load_config
from imgclf.errors import DataError

log = logging.getLogger(__name__)

EMBEDDER_OVERRIDES = [
    # 20 rather than 8: on the bundled sample with 5% flips, 8 epochs gave a head of out-of-sample
    # accuracy 0.756 and flagged at precision 0.77 / recall 0.79; 20 gave 0.781 and 0.83 / 0.83.
    "trainer.epochs=20",
    "trainer.max_time_minutes=10",  # tens of thousands of images stay within minutes; the LR anneals by time
    "trainer.progress_bar=false",
    "loss.label_smoothing=0.1",  # softer targets: slower to memorise the flipped labels
]


def embedder_config(config_path: Path | None, overrides: list[str]) -> TrainConfig:
    return load_config(config_path, EMBEDDER_OVERRIDES + list(overrides))


def train_embedder(data_dir: Path, audit_dir: Path, config: TrainConfig, class_names: list[str]) -> Path:
    """AUDIT_DIR/embedder, trained now or reused from an earlier audit of the same classes."""
    run_dir = Path(audit_dir) / EMBEDDER
    info = rundir.RunDir(run_dir).read_info()
    if info is not None and info.status == "done":
        if list(info.class_names) != list(class_names):
            raise DataError(f"{run_dir}: trained on classes {', '.join(info.class_names)}, the data now has "
                            f"{', '.join(class_names)}; delete {run_dir} to train a new one")
        log.info("reusing the embedding model in %s", run_dir)
        return run_dir
    from imgclf.train import TrainOptions
    from imgclf.train import run as run_training

    resume = rundir.RunDir(run_dir).last.is_file()
    log.info("training an embedding model on %s into %s (%s)", data_dir, run_dir,
             "resuming" if resume else f"{config.model.arch}, {config.trainer.epochs} epochs at most")
    run_training(TrainOptions(config, data_dir, run_dir, resume=resume))
    return run_dir

"""Learning-rate finder: Lightning's `Tuner.lr_find` on the run's own model and training data.

    imgclf train --config C --data D --out RUN_DIR --lr-find     # the curve and a suggestion only
    imgclf train ... optim.lr=find                              # the same, then train with it

The range test (Smith 2015, as fastai popularised it) trains `optim.lr_find_steps` batches
while the learning rate grows exponentially from MIN_LR to MAX_LR, records the smoothed loss
of each, stops once the loss passes 4x its best, and puts the weights back as they were.
Lightning's suggestion is the learning rate where the loss falls fastest. Writes
RUN_DIR/lr_find.png (loss against learning rate, the suggestion marked) and RUN_DIR/lr_find.json
(`suggestion`, `lrs`, `losses`, settings). It runs in its own Trainer (no checkpoints, no
metrics.csv), on one device: with DDP, run `--lr-find` first and set optim.lr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.tuner import Tuner, lr_finder
from torch.utils.data import DataLoader

from imgclf._files import atomic_path, write_atomic
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.progress import interactive
from imgclf.rundir import LR_FIND_JSON, LR_FIND_PNG

log = logging.getLogger(__name__)

MIN_LR = 1e-6
MAX_LR = 1.0


@dataclass
class LrFindResult:
    suggestion: float | None  # None when the loss curve gave no usable point
    lrs: list[float]
    losses: list[float]  # the smoothed training loss at each learning rate
    steps: int
    min_lr: float = MIN_LR
    max_lr: float = MAX_LR

    @classmethod
    def read(cls, run_dir: Path) -> LrFindResult | None:
        path = Path(run_dir) / LR_FIND_JSON
        if not path.is_file():
            return None
        plain = json.loads(path.read_text())
        return cls(**{k: plain[k] for k in cls.__dataclass_fields__ if k in plain})


def checked(config: TrainConfig, lr_find_only: bool) -> TrainConfig:
    """Refuse the finder where it cannot run; a copy when optim.lr will be replaced (the caller's stays)."""
    tcfg = config.trainer
    several = tcfg.num_nodes > 1 or (tcfg.devices not in (1, "1", "auto")) or tcfg.strategy.startswith("ddp")
    if (lr_find_only or config.optim.lr == "find") and several:
        raise ConfigError("optim.lr=find / --lr-find: the finder runs on one device; run `imgclf train --lr-find` "
                          "with trainer.devices=1 first and set optim.lr to its suggestion")
    return config.model_copy(deep=True) if config.optim.lr == "find" else config


def use_suggestion(module: pl.LightningModule, train_loader: DataLoader, config: TrainConfig, run_dir: Path,
                   precision: str, resume: bool) -> TrainConfig:
    """optim.lr=find: run the finder (or, resuming, read its saved result) and train with its suggestion.

    Returns the config with the number in optim.lr, which the module now holds too; the random
    state is re-seeded, so shuffling and augmentation start as in a run without the finder.
    """
    result = LrFindResult.read(run_dir) if resume else None
    if result is None:
        result = find_lr(module, train_loader, config, run_dir, precision)
        pl.seed_everything(config.seed, workers=True, verbose=False)
    if result.suggestion is None:
        raise ConfigError(f"optim.lr=find: the finder found no learning rate to suggest (see {run_dir / LR_FIND_PNG}); "
                          "set optim.lr to a number")
    config.optim.lr = result.suggestion
    module.config = config
    log.info("learning-rate finder: optim.lr = %.3g (curve: %s)", result.suggestion, run_dir / LR_FIND_PNG)
    return config


def find_lr(module: pl.LightningModule, train_loader: DataLoader, config: TrainConfig, run_dir: Path,
            precision: str) -> LrFindResult:
    """Run the range test on `module` (its weights are restored afterwards); write the png and json."""
    steps = config.optim.lr_find_steps
    epochs = math.ceil(steps / max(1, len(train_loader))) + 1  # the finder stops by steps, not epochs
    # The finder parks the initial weights in a checkpoint under default_root_dir: a temporary
    # folder, so a run killed mid-search leaves nothing in RUN_DIR.
    with tempfile.TemporaryDirectory(prefix="imgclf-lr-find-") as scratch, _quiet(), warnings.catch_warnings():
        trainer = pl.Trainer(accelerator=config.trainer.accelerator, devices=1, precision=precision,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, max_epochs=epochs,
                             gradient_clip_val=config.optim.grad_clip, default_root_dir=scratch)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*validation_step.*")  # no validation in a range test
        finder = Tuner(trainer).lr_find(module, train_dataloaders=train_loader, min_lr=MIN_LR, max_lr=MAX_LR,
                                        num_training=steps, update_attr=False)
    assert finder is not None  # None only with fast_dev_run, which imgclf never sets
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) for v in finder.results["loss"]]
    suggestion = _finite(finder.suggestion())
    result = LrFindResult(suggestion, lrs, losses, len(lrs))
    write_result(result, run_dir)
    return result


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's banner and its restore note ("weights_only was not set") are noise around the finder."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector",
             "lightning.pytorch.tuner.lr_finder")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    # The finder draws its own tqdm bar whatever the Trainer says (progress_bar_refresh_rate=1 is
    # hard-coded in Lightning 2.6): in a log that is a hundred carriage-return frames on one line.
    bar = lr_finder.tqdm
    if not interactive():
        lr_finder.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lr_finder.tqdm = bar
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def write_result(result: LrFindResult, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = asdict(result)
    # NaN/inf losses (a diverged last step) become null: the file stays strict JSON.
    plain["losses"] = [v if math.isfinite(v) else None for v in result.losses]
    write_atomic(run_dir / LR_FIND_JSON, json.dumps(plain, indent=2) + "\n")
    with atomic_path(run_dir / LR_FIND_PNG) as tmp:
        plot(result, tmp)


def plot(result: LrFindResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    points = [(lr, loss) for lr, loss in zip(result.lrs, result.losses, strict=True) if math.isfinite(loss)]
    if points:
        ax.plot(*zip(*points, strict=True), color="tab:blue", label="training loss (smoothed)")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="tab:red", linestyle="--",
                   label=f"suggestion {result.suggestion:.2g} (steepest descent)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"learning-rate finder: {result.steps} batches")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def summary(result: LrFindResult, run_dir: Path) -> str:
    """What `imgclf train --lr-find` prints."""
    curve = f"curve: {Path(run_dir) / LR_FIND_PNG}"
    if result.suggestion is None:
        return f"learning-rate finder: no suggestion ({result.steps} batches; too few, or the loss never fell); {curve}"
    return (f"learning-rate finder: suggested optim.lr={result.suggestion:.3g} (steepest fall of the loss, "
            f"{result.steps} batches); {curve}\ntrain with: optim.lr={result.suggestion:.3g} (or optim.lr=find)")

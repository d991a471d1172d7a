"""Learning-rate finder: Lightning's `Tuner.lr_find` on the run's own model and training data.

    imgclf train --config C --data D --out RUN_DIR --lr-find     # the curve and a suggestion only
    imgclf train ... optim.lr=find                              # the same, then train with it

The range test (Smith 2015, as fastai popularised it) trains `optim.lr_find_steps` batches
while the learning rate grows exponentially from MIN_LR to MAX_LR, records the smoothed loss
of each, stops once the loss passes 4x its best, and puts the weights back as they were.

The curve is imgclf's, not Lightning's: Lightning's running average divides by a bias correction one
step ahead of its average (its first point is about half the measured loss: 0.70 for a fresh 4-class
head instead of ln 4 = 1.39), and an exponential average of 0.98 lags 49 steps behind, three decades
of learning rate in a 100-step test. So the raw loss of every step is recorded (RawLoss) and smoothed by
a centred running mean (`smooth`: no lag, and its first point is the first loss measured). The suggestion
(`suggest`) is the steepest fall of that curve between the end of its flat start and its minimum. Writes
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
from dataclasses import asdict, dataclass, field
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
    raw_losses: list[float] = field(default_factory=list)  # as measured, one per step

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
        raw = RawLoss()
        with _recording(raw):
            finder = Tuner(trainer).lr_find(module, train_dataloaders=train_loader, min_lr=MIN_LR, max_lr=MAX_LR,
                                            num_training=steps, update_attr=False, early_stop_threshold=None)
    assert finder is not None  # None only with fast_dev_run, which imgclf never sets
    n = min(len(finder.results["lr"]), len(raw.losses))
    lrs = [float(v) for v in finder.results["lr"][:n]]
    losses = smooth(raw.losses[:n])
    result = LrFindResult(suggest(lrs, losses), lrs, losses, n, raw_losses=raw.losses[:n])
    write_result(result, run_dir)
    return result


DIVERGED = 4.0  # the test stops once the smoothed loss passes DIVERGED x its best


class RawLoss:
    """The training loss of every step of the range test, as measured; stops the test once it diverges."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def record(self, trainer: pl.Trainer, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss) if loss is not None else math.nan)
        recent = self.losses[-3:]
        best = min((v for v in smooth(self.losses) if math.isfinite(v)), default=math.inf)
        if not all(math.isfinite(v) for v in recent) or (len(self.losses) > 10 and
                                                        sum(recent) / len(recent) > DIVERGED * best):
            trainer.should_stop = True


@contextlib.contextmanager
def _recording(raw: RawLoss) -> Iterator[None]:
    """Lightning's finder replaces the Trainer's callbacks by its own _LRCallback: a subclass that also
    hands each step's loss to `raw` stands in for it while the finder runs."""
    original = lr_finder._LRCallback

    class Recording(original):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            raw.record(trainer, outputs)

    lr_finder._LRCallback = Recording
    try:
        yield
    finally:
        lr_finder._LRCallback = original


def _half_window(n: int) -> int:
    return max(1, n // 40)


def smooth(losses: list[float]) -> list[float]:
    """Centred running mean, the window shrinking at both ends: no lag, and point 0 is the loss measured."""
    n = len(losses)
    out = []
    for i in range(n):
        half = min(_half_window(n), i, n - 1 - i)
        window = [v for v in losses[i - half:i + half + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def suggest(lrs: list[float], losses: list[float]) -> float | None:
    """The learning rate where the smoothed loss falls fastest (per decade), between its flat start and its minimum.

    The flat start ends where the loss has fallen a tenth of the way from its start to its minimum: the
    noise of a flat stretch can be steeper than its mean slope, never that deep. None when the loss never
    fell by 5% (nothing to learn from the curve).
    """
    points = [(math.log10(lr), loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss) and lr > 0]
    if len(points) < 5:
        return None
    x, y = [p[0] for p in points], [p[1] for p in points]
    low = min(range(len(y)), key=y.__getitem__)
    drop = y[0] - y[low]
    if drop <= 0.05 * abs(y[0]):
        return None
    start = next(i for i in range(low + 1) if y[0] - y[i] >= 0.1 * drop)
    start = max(1, start - 1)
    slopes = [((y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]), i) for i in range(start, min(low + 1, len(y) - 1))
              if x[i + 1] > x[i - 1]]
    if not slopes:
        return 10 ** x[low]
    return 10 ** x[min(slopes)[1]]


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


def write_result(result: LrFindResult, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = asdict(result)
    # NaN/inf losses (a diverged last step) become null: the file stays strict JSON.
    plain["losses"] = [v if math.isfinite(v) else None for v in result.losses]
    plain["raw_losses"] = [v if math.isfinite(v) else None for v in result.raw_losses]
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

"""The train stage's work: checks before anything is written, the Lightning trainer, the fit, run.json.

`imgclf.train.run` and `find_lr` call `start`; it checks RUN_DIR and DATA_DIR, builds the model,
loaders and trainer (`_run`), and fits (`_fit`, over one `FitJob`), writing what the train
package's docstring lists.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from imgclf import checkpoint, data, models, presets, rundir, storage
from imgclf.config import TrainConfig, save_config
from imgclf.errors import ConfigError, DataError
from imgclf.manifest import MANIFEST_NAME, is_parts, read_manifest
from imgclf.progress import interactive
from imgclf.train import _lr_find, _multilabel, _probe, _stream, _transfer
from imgclf.train._callbacks import MetricsLog, UnreadableGuard, read_metrics
from imgclf.train._inputs import class_names as class_names_of
from imgclf.train._inputs import class_weights, loaders, make_split
from imgclf.train._loggers import make_loggers
from imgclf.train._lr_find import LrFindResult
from imgclf.train._module import ImageClassifier
from imgclf.train._preview import PREVIEW_NAME, write_batch_preview
from imgclf.version import __version__

log = logging.getLogger("imgclf.train")  # the stage's logger, as before this module was split out


@dataclass(frozen=True)
class TrainOptions:
    """What `train.run` trains: a config, on a data directory (a folder or s3://...), into a run directory."""

    config: TrainConfig
    data: Path | str  # DATA_DIR (the manifest's folder); the API and CLI ingest an image folder first (pipeline)
    out: Path  # RUN_DIR
    resume: bool = False  # continue from RUN_DIR/checkpoints/last.ckpt

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    class_names: list[str]
    best_score: float | None  # the monitored metric at the best checkpoint
    epochs_run: int
    seconds: float
    monitor: str = "score"  # the config's trainer.monitor, which best_score is

    def summary(self) -> str:
        """One line: epochs, time, best score and checkpoint; the stage logs it as its last line (the CLI's output)."""
        score = f"{self.best_score:.4f}" if self.best_score is not None else "n/a"
        return (f"trained {self.epochs_run} epoch(s) in {self.seconds:.0f}s; best {self.monitor} = {score} -> "
                f"{self.best_checkpoint}")


def start(config: TrainConfig, data_dir: Path | str, run_dir: Path, resume: bool,
           lr_find_only: bool) -> TrainResult | LrFindResult:
    started = time.perf_counter()
    config = _lr_find.checked(config, lr_find_only)
    # DATA_DIR may be on object storage (s3://...): kept as the URL, read through imgclf.storage.
    data_dir, run_dir = storage.location(storage.display(data_dir)), Path(run_dir)
    last = rundir.RunDir(run_dir).last
    if resume and not last.is_file():
        raise DataError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt)")
    if not resume and not lr_find_only and last.is_file():
        info = rundir.RunDir(run_dir).read_info()
        if info is not None and info.status == "interrupted":
            raise DataError(f"{run_dir}: holds an interrupted run; continue it with --resume (Python: resume=True) "
                            "or choose a new --out")
        raise DataError(f"{run_dir}: already holds a trained run; pass --resume or choose a new --out")
    if not storage.exists(data_dir, MANIFEST_NAME) and not is_parts(data_dir):
        read_manifest(data_dir)  # raises the standard one-line error, before RUN_DIR is created
    pl.seed_everything(config.seed, workers=True, verbose=False)
    threads_before = torch.get_num_threads()
    try:
        _set_cpu_threads(config)
        return _run(config, data_dir, run_dir, resume, started, lr_find_only)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _run(config: TrainConfig, data_dir: Path, run_dir: Path, resume: bool, started: float,
         lr_find_only: bool) -> TrainResult | LrFindResult:
    last = rundir.RunDir(run_dir).last
    zero = rank_zero_only.rank == 0
    split = make_split(config, data_dir, run_dir, resume)
    class_names = class_names_of(config, split)
    if resume:
        _check_resumable(config, last, class_names)
    # The model first: its initial weights then depend on the seed only, not on data loading.
    model = models.create_model(config.model.arch, len(class_names), config.model.pretrained,
                                config.model.weights, config.model.cache_dir, config.model.dropout,
                                config.model.small_input, config.model.timm_kwargs)
    guard, position = UnreadableGuard(config.data.max_unreadable), _stream.StreamPosition()
    with _quiet_lightning():
        trainer = _trainer(config, run_dir, [guard, position])
    pre = presets.Preprocessing.from_config(config.data)
    train_loader, val_loader = loaders(config, split, data_dir, class_names, pre, position)
    guard.datasets = [train_loader.dataset, val_loader.dataset]
    guard.check()  # with the RAM cache every image has been read once already
    if lr_find_only:  # writes lr_find.png/json only: never a config or split over a trained run's
        module = _make_module(config, model, split, class_names, pre, len(train_loader), train_loader)
        return _lr_find.find_lr(module, train_loader, config, run_dir, _precision(config))
    created = not run_dir.exists()
    try:
        return _fit(FitJob(config, data_dir, run_dir, resume, started, split, class_names, model, trainer, guard,
                           (train_loader, val_loader), pre))
    except DataError:
        if zero:  # e.g. too many unreadable images: leave no half-made run directory behind
            _after_failure(run_dir, data_dir, class_names, config, not resume, created, guard.unreadable)
        raise


@dataclass(frozen=True)
class FitJob:
    """Everything one fit needs, gathered by `_run` (one object, as nanoGPT passes its GPTConfig whole)."""

    config: TrainConfig
    data_dir: Path
    run_dir: Path
    resume: bool
    started: float  # perf_counter at the start of the command: run.json's last_seconds counts from it
    split: pd.DataFrame | _stream.StreamSplit  # a rule and counts for a streamed parts manifest
    class_names: list[str]
    model: torch.nn.Module
    trainer: pl.Trainer
    guard: UnreadableGuard
    loaders: tuple[DataLoader, DataLoader]  # train, val
    pre: presets.Preprocessing


def _fit(job: FitJob) -> TrainResult:
    config, data_dir, run_dir, resume, started = job.config, job.data_dir, job.run_dir, job.resume, job.started
    split, class_names, model, trainer, guard, loaders, pre = (job.split, job.class_names, job.model, job.trainer,
                                                                job.guard, job.loaders, job.pre)
    last = rundir.RunDir(run_dir).last
    zero = rank_zero_only.rank == 0
    train_loader, val_loader = loaders
    rule = _stream.run_info_fields(split)  # run.json's split_rule, for a streamed split
    if zero:  # only now: unusable data or config must not leave a half-made run directory behind
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, rundir.RunDir(run_dir).config)
        if isinstance(split, pd.DataFrame) and (not resume or not (run_dir / data.SPLIT_NAME).is_file()):
            data.write_split(split, run_dir)  # a streamed split is a rule: run.json's split_rule
        write_batch_preview(_stream.previewable(train_loader.dataset), class_names, run_dir, seed=config.seed)
    module = _make_module(config, model, split, class_names, pre, len(train_loader), train_loader)
    module.freeze_epochs = _transfer.freeze_plan(config, model)
    probe = _transfer.start_probe(config, module, train_loader, resume)  # (state, fit) or None
    if config.optim.lr == "find":  # the finder's suggestion replaces "find", also in config.yaml
        config = _lr_find.use_suggestion(module, train_loader, config, run_dir, _precision(config), resume)
        if zero:
            save_config(config, rundir.RunDir(run_dir).config)
    if zero:
        _write_run_info(run_dir, data_dir, class_names, config, extra={"status": "training", **rule})
    with warnings.catch_warnings(), _quiet_lightning():
        # Lightning suggests more workers than the 2 cores we tune for; the advice is noise here.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # --resume writes there
        # A streamed parts manifest deals each batch to one worker (train/_stream.py): its len() is exact.
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume else None)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1); record it and let the CLI report an
            # interruption (exit 130, "resume with --resume"), not a failure.
            if zero:
                _write_run_info(run_dir, data_dir, class_names, config, extra={"status": "interrupted", **rule})
            raise KeyboardInterrupt(_resume_hint(run_dir, last)) from None

    best = Path(trainer.checkpoint_callback.best_model_path or last)
    kept = None
    if probe and config.model.keep == "better" and zero and not module.multilabel and best.is_file() \
            and best != last:  # the better of it and the linear probe (single-label)
        kept = _probe.keep_better(module, best, val_loader, *probe)
    if zero and module.multilabel:  # per-label thresholds, on validation, into best.ckpt and last.ckpt
        _multilabel.fit_thresholds(module, best, val_loader, [best, last])
    score = trainer.checkpoint_callback.best_model_score
    best_score = float(score) if score is not None else None
    epochs = len(read_metrics(run_dir)) if zero else trainer.current_epoch
    seconds = time.perf_counter() - started
    if zero:
        _write_run_info(run_dir, data_dir, class_names, config, extra={
            "status": "done", **rule, "best_score": best_score, "monitor": config.trainer.monitor,
            "epochs_run": epochs, "collapsed_epochs": module.collapsed_epochs,
            "best_checkpoint": _relative(best, run_dir), "last_seconds": round(seconds, 1),
            "unreadable_images": guard.unreadable, **({"kept": kept.as_json()} if kept else {})})
    result = TrainResult(run_dir, best, last, class_names, best_score, epochs, seconds, config.trainer.monitor)
    if zero:
        log.info("%s", result.summary())
        _warn_if_ended_collapsed(module.collapsed_epochs, epochs)
    return result


def _make_module(config: TrainConfig, model: torch.nn.Module, split: pd.DataFrame | _stream.StreamSplit,
                 class_names: list[str], pre: presets.Preprocessing, steps_per_epoch: int,
                 train_loader: DataLoader | None = None) -> ImageClassifier:
    _tune_batchnorm(model, config, steps_per_epoch)
    if config.trainer.compile:
        model.compile()  # in place: state_dict keys stay those of the plain model
    # task: multilabel: the train subset's (N, C) targets size loss.pos_weight: auto.
    targets = train_loader.dataset.targets if train_loader is not None and config.task == "multilabel" else None
    if targets is not None and _transfer.has_pretrained_backbone(config):  # a new head on pretrained features
        _multilabel.init_head(model, targets, config.seed)  # (a resumed run's checkpoint replaces it)
    return ImageClassifier(model, config, class_names, pre, class_weights(config, split, class_names), targets)


def _warn_if_ended_collapsed(collapsed: list[int], epochs: int) -> None:
    """A run whose last epoch predicts one class must not end on an info line only.

    The module warns when a collapse lasts two epochs; a single collapsed last epoch (a 1-epoch
    run, or a relapse at the end) was only noted, so it is warned here.
    """
    last = epochs - 1
    if collapsed and collapsed[-1] == last and last - 1 not in collapsed:
        log.warning("the last epoch (%d) predicted one class for 90%% or more of the validation images: "
                    "train longer, or check model.bn_momentum and optim.lr", last + 1)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banner (GPU/TPU available, logger tips) is noise in a CLI run."""
    chatty = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        yield
    finally:
        chatty.setLevel(level)


def _check_resumable(config: TrainConfig, last: Path, class_names: list[str]) -> None:
    """Refuse a resume whose config or data would not fit the saved weights (before touching RUN_DIR)."""
    saved = checkpoint.describe(checkpoint.read_checkpoint(last)["imgclf"], last)
    before = {"model.arch": saved.arch, "data.image_size": saved.preprocessing.image_size}
    given = {"model.arch": config.model.arch, "data.image_size": config.data.image_size}
    for key, value in before.items():
        if given[key] != value:
            raise ConfigError(f"{last}: trained with {key}={value}, resumed with {given[key]}; "
                              "resume without --config to reuse the run's config.yaml")
    if saved.class_names != class_names:
        raise DataError(f"{last}: the run's classes differ from those in its split.csv; start a new run")


# ---- data ---------------------------------------------------------------------------------------
# ---- model and trainer --------------------------------------------------------------------------
def auto_bn_momentum(steps_per_epoch: int) -> float:
    """Momentum that refreshes 99% of the running statistics within one epoch, in [0.1, 0.5].

    torchvision's mobilenet_v3 uses 0.01 (tuned for ImageNet's thousands of steps per epoch): on
    a few thousand images the running statistics lag the weights and eval mode predicts one class.
    """
    return min(0.5, max(0.1, 1.0 - 0.01 ** (1.0 / max(1, steps_per_epoch))))


def _tune_batchnorm(model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int) -> None:
    choice = config.model.bn_momentum
    if choice == "library":
        return
    momentum = auto_bn_momentum(steps_per_epoch) if choice == "auto" else float(choice)
    count = models.set_bn_momentum(model, momentum)
    if count:
        log.info("BatchNorm momentum %.3f on %d layers (%d steps/epoch)", momentum, count, steps_per_epoch)


def _set_cpu_threads(config: TrainConfig) -> None:
    """Keep our own threads and worker processes within the cores (CPU training only)."""
    tcfg = config.trainer
    if tcfg.accelerator not in ("auto", "cpu") or (tcfg.accelerator == "auto" and torch.cuda.is_available()):
        return
    if tcfg.cpu_threads == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_processes = tcfg.devices if isinstance(tcfg.devices, int) else 1  # DDP: one per device
        threads = max(1, cores // max(1, local_processes) - config.data.num_workers)
    else:
        threads = int(tcfg.cpu_threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("CPU training with %d thread(s) and %d loader worker(s)", threads, config.data.num_workers)


def _precision(config: TrainConfig) -> str:
    if config.trainer.precision != "auto":
        return "32-true" if config.trainer.precision == "32" else config.trainer.precision
    if config.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _strategy(config: TrainConfig) -> str:
    """DDP must know that frozen backbone parameters get no gradients in the first epochs."""
    if config.trainer.strategy == "ddp" and config.model.freeze_backbone_epochs > 0:
        return "ddp_find_unused_parameters_true"
    return config.trainer.strategy


def _trainer(config: TrainConfig, run_dir: Path, extra: list[pl.Callback]) -> pl.Trainer:
    tcfg = config.trainer
    mode = "min" if tcfg.monitor == "val_loss" else "max"
    callbacks: list[pl.Callback] = [
        *extra,
        pl.callbacks.ModelCheckpoint(dirpath=rundir.RunDir(run_dir).checkpoints, filename="best", monitor=tcfg.monitor,
                                     mode=mode, save_top_k=1, save_last=False, enable_version_counter=False,
                                     auto_insert_metric_name=False),
        # last.ckpt by a checkpoint of its own, every epoch: Lightning 2.6's save_last writes it only
        # in epochs where `best` was saved, so a run whose monitor stopped improving would resume
        # from its last improvement, epochs behind.
        pl.callbacks.ModelCheckpoint(dirpath=rundir.RunDir(run_dir).checkpoints, filename="last", monitor=None,
                                     save_top_k=1, enable_version_counter=False),
        MetricsLog(run_dir),
    ]
    if tcfg.early_stopping_patience:
        callbacks.append(pl.callbacks.EarlyStopping(monitor=tcfg.monitor, mode=mode,
                                                    patience=tcfg.early_stopping_patience))
    bars = tcfg.progress_bar and interactive()  # in a log, the per-epoch line (MetricsLog) is the progress
    if bars:
        callbacks.append(pl.callbacks.TQDMProgressBar())
    try:
        return pl.Trainer(
            max_epochs=tcfg.epochs,
            max_time={"minutes": tcfg.max_time_minutes} if tcfg.max_time_minutes else None,
            accelerator=tcfg.accelerator, devices=tcfg.devices, num_nodes=tcfg.num_nodes,
            strategy=_strategy(config), precision=_precision(config),
            gradient_clip_val=config.optim.grad_clip,
            callbacks=callbacks, logger=make_loggers(config, run_dir),
            enable_progress_bar=bars, enable_model_summary=False,
            num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=run_dir,
        )
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
        # Lightning checks the device request here: no GPU, a bad devices value, an unknown strategy.
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"trainer.accelerator={tcfg.accelerator} devices={tcfg.devices} "
                          f"strategy={tcfg.strategy}: {first}") from None


# ---- run directory ------------------------------------------------------------------------------
def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _resume_hint(run_dir: Path, last: Path) -> str:
    """What the user reads after Ctrl-C: how far it got and how to go on."""
    if not last.is_file():
        return f"{run_dir}: no epoch finished; run the same command again to start over"
    return (f"{run_dir}: stopped after epoch {len(read_metrics(run_dir))}; continue with the same command plus "
            "--resume (Python: resume=True)")


def _after_failure(run_dir: Path, data_dir: Path, class_names: list[str], config: TrainConfig, fresh: bool,
                   created: bool, unreadable: int) -> None:
    """A run stopped by bad data: a fresh run that saved no checkpoint leaves nothing behind (the
    folder too, when it made it); one that did keeps its checkpoints with run.json status "failed"."""
    run = rundir.RunDir(run_dir)
    if not run_dir.is_dir():
        return
    if fresh and not run.last.is_file():
        for name in (rundir.CONFIG, rundir.SPLIT, rundir.RUN_INFO, rundir.METRICS_CSV, rundir.CURVES, PREVIEW_NAME):
            (run_dir / name).unlink(missing_ok=True)
        for folder in (run.checkpoints, run_dir) if created else (run.checkpoints,):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: never files this run did not write
        return
    _write_run_info(run_dir, data_dir, class_names, config, extra={"status": "failed",
                                                                   "unreadable_images": unreadable})


def _write_run_info(run_dir: Path, data_dir: Path, class_names: list[str], config: TrainConfig,
                    extra: dict[str, Any]) -> None:
    fields = {"data_dir": str(data_dir), "class_names": class_names, "imgclf_version": __version__,
              "arch": config.model.arch, "seed": config.seed, "torch_version": torch.__version__,
              "world_size": int(os.environ.get("WORLD_SIZE", 1))}
    fields.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extra.items()})
    rundir.RunDir(run_dir).write_info(rundir.RunInfo(**fields))

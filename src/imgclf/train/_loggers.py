"""Experiment trackers through Lightning's own loggers: TensorBoard and MLflow (trainer.logger).

metrics.csv and curves.png are always written (train/_callbacks.py); these are for people who
already track experiments elsewhere. MLflow defaults to a local file store in RUN_DIR/mlruns,
which needs no server and works offline (`mlflow ui --backend-store-uri RUN_DIR/mlruns` shows it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.rundir import MLFLOW, TENSORBOARD


def _wanted(config: TrainConfig) -> list[str]:
    tcfg = config.trainer
    names = [tcfg.logger] if isinstance(tcfg.logger, str) else list(tcfg.logger)
    names = [n for n in names if n != "none"]
    if tcfg.tensorboard and "tensorboard" not in names:  # the key before trainer.logger existed
        names.append("tensorboard")
    return names


def _tensorboard(run_dir: Path) -> pl.loggers.Logger:
    try:
        return pl.loggers.TensorBoardLogger(run_dir, name=TENSORBOARD)
    except ModuleNotFoundError:
        raise ConfigError("trainer.logger: tensorboard needs the tensorboard package "
                          "(pip install tensorboard)") from None


def _mlflow(config: TrainConfig, run_dir: Path) -> pl.loggers.Logger:
    try:
        import mlflow  # noqa: F401 - only to give a clear error when it is missing
    except ModuleNotFoundError:
        raise ConfigError("trainer.logger: mlflow needs the mlflow package "
                          "(pip install 'imgclf[track]' or mlflow-skinny)") from None
    uri = config.trainer.mlflow_tracking_uri or (run_dir.resolve() / MLFLOW).as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked; a local, server-less store is the point here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return pl.loggers.MLFlowLogger(experiment_name=config.trainer.mlflow_experiment, tracking_uri=uri,
                                   run_name=run_dir.name, log_model=False)


def make_loggers(config: TrainConfig, run_dir: Path) -> list[Any] | bool:
    """The Lightning loggers trainer.logger asks for (False: none)."""
    loggers = []
    for name in _wanted(config):
        logger = _tensorboard(run_dir) if name == "tensorboard" else _mlflow(config, run_dir)
        logger.log_hyperparams(config.to_plain())  # the whole resolved config, flattened (model/arch, ...)
        loggers.append(logger)
    return loggers or False

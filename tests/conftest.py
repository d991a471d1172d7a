"""Shared fixtures: a small real data directory and a small really-trained run.

Session-scoped so the suite trains the shared tiny model once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CLASSES, make_data_dir

TINY_CLASSES = CLASSES[:3]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 24 train + 10 test real Fashion-MNIST images each, manifest included."""
    return make_data_dir(tmp_path_factory.mktemp("data"), TINY_CLASSES, n_train=24, n_test=10)


def tiny_config(*extra: str):
    """Config for tests: tiny images, 2 epochs, no worker processes; extra dotted overrides win."""
    from imgclf.config import load_config

    overrides = ["trainer.epochs=2", "trainer.batch_size=16", "data.image_size=32", "data.num_workers=0",
                 "trainer.progress_bar=false", "model.arch=resnet18"]
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    """A run directory really trained for 2 epochs (seconds) on tiny_data_dir."""
    from imgclf.stages import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train.run(train.TrainOptions(tiny_config(), tiny_data_dir, run_dir))
    return run_dir

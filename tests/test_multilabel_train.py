"""task: multilabel training through the Python API: the loss options really train, thresholds are
chosen after fit and stored, and a resumed run keeps its label vocabulary."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from ml_composites import LABELS, make_corpus, write_table

from imgclf import checkpoint
from imgclf.stages import download, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mltrain")
    table = write_table(root, make_corpus(root, 48, "train", seed=5), "train.csv")
    download.run(download.DownloadOptions(sources=[table], out=root / "D", show_progress=False, print_summary=False,
                                                                processes=1, label_sep="|"))
    return root / "D"


@pytest.mark.parametrize("loss", [["loss.name=asl", "loss.gamma_neg=2"], ["loss.pos_weight=auto"]])
def test_losses_train_and_thresholds_are_stored(data_dir, tmp_path, loss, caplog):
    config = tiny_config("task=multilabel", "trainer.epochs=1", *loss)
    with caplog.at_level("INFO", logger="imgclf.train"):
        result = train.run(train.TrainOptions(config, data_dir, tmp_path / "run"))
    assert result.class_names == LABELS
    assert "per-label thresholds chosen on" in caplog.text
    if "loss.pos_weight=auto" in loss:
        assert "bce pos_weight" in caplog.text
    for name in ("best.ckpt", "last.ckpt"):
        meta = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)["imgclf"]
        assert meta["task"] == "multilabel" and len(meta["thresholds"]) == len(LABELS)
    loaded = checkpoint.load_model(tmp_path / "run")
    assert loaded.config.loss.name == ("asl" if "loss.name=asl" in loss else "bce")
    logits = loaded.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, len(LABELS))


def test_resume_keeps_the_label_vocabulary(data_dir, tmp_path):
    run = tmp_path / "run"
    train.run(train.TrainOptions(tiny_config("task=multilabel", "trainer.epochs=1"), data_dir, run))
    resumed = train.run(train.TrainOptions(tiny_config("task=multilabel", "trainer.epochs=2"), data_dir, run,
                                           resume=True))
    assert resumed.class_names == LABELS and resumed.epochs_run == 2
    assert checkpoint.load_model(run).thresholds is not None

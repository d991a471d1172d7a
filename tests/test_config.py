"""Config loading: YAML + dotted overrides, validated; bad input is one line naming the key, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imgclf.config import TrainConfig, load_config, parse_overrides, save_config
from imgclf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_seed_workflow() -> None:
    config = TrainConfig()
    assert config.model.arch == "mobilenet_v3_small"
    assert config.data.val_fraction == 0.15
    assert config.loss.name == "cross_entropy"


def test_overrides_are_typed_and_nested() -> None:
    assert parse_overrides(["trainer.epochs=3", "data.augment.hflip=false", "model.arch=resnet18"]) == {
        "trainer": {"epochs": 3}, "data": {"augment": {"hflip": False}}, "model": {"arch": "resnet18"}}
    config = load_config(None, ["trainer.epochs=3", "data.augment.crop_scale=[0.5, 1.0]"])
    assert config.trainer.epochs == 3
    assert config.data.augment.crop_scale == (0.5, 1.0)


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: 7\n  batch_size: 8\nmodel:\n  arch: resnet18\n")
    config = load_config(path, ["trainer.epochs=2"])
    assert (config.trainer.epochs, config.trainer.batch_size, config.model.arch) == (2, 8, "resnet18")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None, ["seed=7", "optim.lr=0.01"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("text, key", [
    ("trainer:\n  epochz: 3\n", "trainer.epochz"),
    ("tranier:\n  epochs: 3\n", "tranier"),
    ("trainer:\n  epochs: many\n", "trainer.epochs"),
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction"),
    ("optim:\n  name: adam2\n", "optim.name"),
    # Values torchvision would only reject mid-epoch, with a traceback, after RUN_DIR was made.
    ("data:\n  augment:\n    crop_scale: [1.2, 0.5]\n", "data.augment.crop_scale"),
    ("data:\n  augment:\n    crop_scale: [0, 1]\n", "data.augment.crop_scale"),
    ("data:\n  std: [0.2, 0, 0.2]\n", "data.std"),
])
def test_bad_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert f"'{key}'" in message and str(path) in message and "\n" not in message


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.epochs"])


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


@pytest.mark.parametrize("args, key", [
    (["trainer.epochz=3"], "unknown key 'trainer.epochz'"),
    (["trainer.batch_size=lots"], "bad value for 'trainer.batch_size'"),
])
def test_cli_config_error_exits_2_with_one_line(tmp_path: Path, args: list[str], key: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "imgclf", "train", "--data", str(tmp_path), "--out",
                           str(tmp_path / "run"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and key in proc.stderr, proc.stderr


def test_bundled_configs_are_valid() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ holds the documented configs"
    for path in configs:
        load_config(path)
        assert isinstance(yaml.safe_load(path.read_text()), dict)

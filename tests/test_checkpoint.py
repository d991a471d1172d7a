"""checkpoint.py: slim files and Lightning checkpoints both rebuild the model, weights_only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from imgclf import checkpoint
from imgclf.errors import DataError


def test_save_slim_round_trips_a_trained_run(tiny_run: Path, tmp_path: Path) -> None:
    full = checkpoint.read_checkpoint(tiny_run)
    state = {k: v for k, v in full["state_dict"].items() if k.startswith("model.")}
    slim = checkpoint.save_slim(tmp_path / "w" / "model.pt", state, full["imgclf"])
    raw = torch.load(slim, weights_only=True)
    assert set(raw) == {"state_dict", "imgclf"}
    assert slim.stat().st_size < (tiny_run / "checkpoints" / "best.ckpt").stat().st_size  # no optimizer
    a, b = checkpoint.load_model(slim), checkpoint.load_model(tiny_run)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    assert a.class_names == b.class_names and a.preprocessing == b.preprocessing
    assert a.config == tiny_config()


def test_resolve_and_read_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no checkpoints"):
        checkpoint.resolve_checkpoint(tmp_path)
    with pytest.raises(DataError, match="no such"):
        checkpoint.resolve_checkpoint(tmp_path / "nope.ckpt")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(DataError, match="no 'imgclf' metadata"):
        checkpoint.read_checkpoint(plain)


def _tampered(tiny_run: Path, tmp_path: Path, change) -> Path:
    ckpt = checkpoint.read_checkpoint(tiny_run)
    change(ckpt)
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    return path


def _wrong_head(ckpt: dict) -> None:
    # One more output than there are class names: a head that belongs to some other dataset.
    rows, cols = ckpt["state_dict"]["model.fc.weight"].shape
    ckpt["state_dict"]["model.fc.weight"] = torch.zeros(rows + 1, cols)
    ckpt["state_dict"]["model.fc.bias"] = torch.zeros(rows + 1)


def test_weights_that_do_not_fit_the_architecture_are_a_data_error(tiny_run: Path, tmp_path: Path) -> None:
    path = _tampered(tiny_run, tmp_path, _wrong_head)
    with pytest.raises(DataError, match=r"tampered\.ckpt: weights do not match") as info:
        checkpoint.load_model(path)
    assert "\n" not in str(info.value)


def test_incomplete_or_newer_metadata_is_a_data_error(tiny_run: Path, tmp_path: Path) -> None:
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"].pop("config"))
    with pytest.raises(DataError, match=r"tampered\.ckpt: imgclf metadata lacks config"):
        checkpoint.load_model(path)
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"].update(format=1))  # format 1 also held these
    with pytest.raises(DataError, match=r"tampered\.ckpt: imgclf metadata lacks arch, preprocessing"):
        checkpoint.load_model(path)
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"].update(format=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(DataError, match="upgrade imgclf"):
        checkpoint.load_model(path)
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"]["config"].update(seed="not a number"))
    with pytest.raises(DataError, match="metadata is invalid"):
        checkpoint.load_model(path)


def test_each_fact_is_held_once_and_format_1_still_loads(tiny_run: Path, tmp_path: Path) -> None:
    meta = checkpoint.read_checkpoint(tiny_run)["imgclf"]
    assert set(meta) == {"format", "class_names", "config"} and meta["format"] == 2
    desc = checkpoint.describe(meta)
    assert desc.arch == "resnet18" and desc.preprocessing.image_size == 32
    # A format-1 file (the weights shipped before) names arch and preprocessing itself.
    old = dict(meta, format=1, arch=desc.arch, preprocessing=desc.preprocessing.to_plain())
    path = _tampered(tiny_run, tmp_path, lambda c: c.update(imgclf=old))
    loaded = checkpoint.load_model(path)
    assert loaded.preprocessing == desc.preprocessing and loaded.class_names == desc.class_names


def test_preprocessing_follows_the_config_everywhere(tiny_data_dir: Path, tmp_path: Path) -> None:
    """data.interpolation reaches the checkpoint, training's decoder and the eval transform alike."""
    from imgclf import data, presets

    config = tiny_config("data.interpolation=bicubic")
    pre = presets.Preprocessing.from_config(config.data)
    assert pre.interpolation == "bicubic"
    meta = checkpoint.make_meta(config, ["a", "b"], pre)
    assert checkpoint.describe(meta).preprocessing == pre
    big = tmp_path / "big.png"
    from PIL import Image

    Image.effect_noise((90, 70), 60).convert("RGB").save(big)
    decoded = {mode: data.decode_resized(Image.open(big).convert("RGB"), 40, mode) for mode in ("bilinear", "bicubic")}
    assert decoded["bilinear"].shape == decoded["bicubic"].shape == (3, 40, 51)  # 90x70 -> short side 40
    assert not torch.equal(decoded["bilinear"], decoded["bicubic"])
    want = presets.eval_resize(pre)(Image.open(big).convert("RGB"))
    got = presets.eval_resize(pre)(decoded["bicubic"])
    assert got.shape == want.shape

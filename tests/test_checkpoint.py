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
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"].pop("preprocessing"))
    with pytest.raises(DataError, match=r"tampered\.ckpt: imgclf metadata lacks preprocessing"):
        checkpoint.load_model(path)
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"].update(format=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(DataError, match="upgrade imgclf"):
        checkpoint.load_model(path)
    path = _tampered(tiny_run, tmp_path, lambda c: c["imgclf"]["config"].update(seed="not a number"))
    with pytest.raises(DataError, match="metadata is invalid"):
        checkpoint.load_model(path)

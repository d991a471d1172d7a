"""Hostile inputs to imgclf's smaller surfaces (issue 22, classes 9 and 10): checkpoint metadata
that would size the model before its weights are checked, and the SSRF address table.

Checkpoints are real files written with torch.save and loaded by `imgclf predict` in a child
process under RLIMIT_AS, whose peak RSS (VmHWM) is compared with the same command on an honest
checkpoint in the same test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config
from helpers import demo_images
from hostile import run_cli

from imgclf import checkpoint
from imgclf.errors import DataError
from imgclf.models import create_model

# ---------------------------------------------------------------- class 9: checkpoint metadata


def _checkpoint(path: Path, class_names: list[str], *overrides: str, state_classes: int = 3,
                timm_kwargs: dict[str, Any] | None = None) -> Path:
    """A slim checkpoint whose tensors are an honest `state_classes`-way model, and whose metadata
    says `class_names` and `timm_kwargs` (set after validation: what a hostile file may hold)."""
    config = tiny_config(*overrides)
    model = create_model(config.model.arch, state_classes, small_input=config.model.small_input,
                         timm_kwargs=config.model.timm_kwargs)
    meta = checkpoint.make_meta(config, class_names)
    if timm_kwargs is not None:
        meta["config"]["model"]["timm_kwargs"] = timm_kwargs
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    return checkpoint.save_slim(path, state, meta)


def test_300000_class_names_are_refused_before_the_head_is_built(tmp_path: Path) -> None:
    image = str(demo_images("test", "Bag", 1)[0])
    honest = _checkpoint(tmp_path / "honest.pt", ["a", "b", "c"])
    names = [f"class-{i}" for i in range(300_000)]  # resnet18's head for these: 300,000 x 512 floats
    hostile = _checkpoint(tmp_path / "hostile.pt", names)
    base = run_cli(["predict", "--model", str(honest), image], address_space_mib=6144)
    assert base.returncode == 0, base.stderr[-2000:]
    got = run_cli(["predict", "--model", str(hostile), image], address_space_mib=6144)
    assert got.returncode == 2, got.stderr[-2000:]
    line = [x for x in got.stderr.splitlines() if "hostile.pt" in x]
    assert line and "weights do not match resnet18 with 300000 classes" in line[0]
    assert "fc.weight is (3, 512), expected (300000, 512)" in line[0]
    # Before: 1.95 GB. The names themselves (~20 MB of str) are all the hostile file may cost.
    assert got.peak_rss_mib < base.peak_rss_mib + 150, (got.peak_rss_mib, base.peak_rss_mib)


def test_timm_arguments_that_load_files_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"not a checkpoint")
    for key, value in (("checkpoint_path", str(secret)), ("pretrained_cfg", "x"), ("pretrained", True),
                       ("pruned", str(secret)), ("features_only", True)):
        path = _checkpoint(tmp_path / f"{key}.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                           timm_kwargs={key: value})
        with pytest.raises(DataError, match=rf"{key}\.pt: .*timm_kwargs\.{key}, which controls how weights"):
            checkpoint.load_model(path)
    path = _checkpoint(tmp_path / "nested.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                       timm_kwargs={"act_layer": {"__class__": "os.system"}})
    with pytest.raises(DataError, match=r"timm_kwargs\.act_layer is not a plain value"):
        checkpoint.load_model(path)


def test_timm_kwargs_far_from_the_stored_tensors_cost_nothing(tmp_path: Path) -> None:
    arch = "model.arch=timm/vit_tiny_patch16_224"
    wide = _checkpoint(tmp_path / "wide.pt", ["a", "b", "c"], arch, "data.image_size=224",
                       timm_kwargs={"embed_dim": 12288})
    image = str(demo_images("test", "Bag", 1)[0])
    got = run_cli(["predict", "--model", str(wide), image], address_space_mib=6144)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "weights do not match timm/vit_tiny_patch16_224" in got.stderr and "expected" in got.stderr
    assert got.peak_rss_mib < 1500, got.peak_rss_mib  # before: 3.1 GB for this 192-wide file
    # Depth drives the number of Python objects, which the meta device does not make free: the
    # build stops once it registers far more than the file stores.
    deep = _checkpoint(tmp_path / "deep.pt", ["a", "b", "c"], arch, "data.image_size=224",
                       timm_kwargs={"depth": 100_000})
    with pytest.raises(DataError, match=r"deep\.pt: .*far larger than the \d+ tensors the file stores"):
        checkpoint.load_model(deep)


def test_an_honest_timm_checkpoint_with_kwargs_still_loads(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ok.pt", ["a", "b", "c"], "model.arch=timm/resnet10t",
                       "model.timm_kwargs={drop_path_rate: 0.1}")
    loaded = checkpoint.load_model(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.config.model.timm_kwargs == {"drop_path_rate": 0.1}
    with pytest.raises(Exception, match=r"timm_kwargs\.checkpoint_path: controls how timm loads weights"):
        create_model("timm/resnet10t", 3, timm_kwargs={"checkpoint_path": "/etc/passwd"})

"""data.py: the seeded stratified split, and decoded uint8 images that match eval preprocessing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import CLASSES, demo_images, make_data_dir
from PIL import Image

from imgclf import data, presets
from imgclf.config import DataConfig
from imgclf.images import open_image_file


def test_split_is_stratified_seeded_and_saved(tiny_data_dir: Path, tmp_path: Path) -> None:
    split = data.make_split(tiny_data_dir, val_fraction=0.25, seed=3)
    data.write_split(split, tmp_path)
    assert (tmp_path / data.SPLIT_NAME).is_file()
    assert split[split["subset"] == "val"].groupby("label").size().tolist() == [6, 6, 6]
    assert set(split["label"]) == set(CLASSES[:3]) and len(split) == 72  # the test split stays out
    again = data.make_split(tiny_data_dir, 0.25, seed=3)
    pd.testing.assert_frame_equal(split.reset_index(drop=True), again.reset_index(drop=True))
    other = data.make_split(tiny_data_dir, 0.25, seed=4)
    assert set(other.loc[other["subset"] == "val", "row"]) != set(split.loc[split["subset"] == "val", "row"])
    # The saved split reads back exactly: resumed runs and evaluation see the same images.
    reread = data.read_split(tmp_path)
    assert reread["row"].tolist() == split["row"].tolist()
    assert reread["subset"].tolist() == split["subset"].tolist()


def test_single_image_class_stays_in_train(caplog: pytest.LogCaptureFixture) -> None:
    labels = pd.Series(["a"] * 10 + ["b"] * 2 + ["c"])
    with caplog.at_level("WARNING"):
        is_val = data.stratified_split(labels, 0.15, seed=0)
    assert is_val[:10].sum() == 2 and is_val[10:12].sum() == 1 and not is_val[12]
    assert "'c'" in caplog.text


def _big_png(dest: Path) -> Path:
    """A real encoded PNG larger than the eval resize (Fashion-MNIST upscaled, non-square)."""
    src = demo_images("train", CLASSES[0], 1)[0]
    with Image.open(src) as im:
        im.convert("RGB").resize((90, 120), Image.BICUBIC).save(dest)
    return dest


@pytest.mark.parametrize("cache", [False, True])
def test_decoded_images_match_eval_transform_exactly(tmp_path: Path, cache: bool) -> None:
    """Validation in train (uint8, maybe cached) sees what predict/serve's eval_transform sees."""
    data_dir = make_data_dir(tmp_path / "d", CLASSES[:2], n_train=3, n_test=0)
    big = _big_png(data_dir / "images" / "big.png")
    frame = pd.DataFrame({"path": ["images/big.png", *_paths(data_dir)],
                          "label": [CLASSES[0]] + [CLASSES[0]] * 3 + [CLASSES[1]] * 3})
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    dataset = data.DecodedImages(frame, data_dir, CLASSES[:2], pre.resize_size, presets.eval_resize(pre))
    if cache:
        dataset.fill_cache(num_workers=0)
        assert dataset.cache is not None and dataset.cache[0].shape == (3, 49, 37)  # shrunk, aspect kept
        assert dataset.cache[1].shape == (3, 28, 28)  # never enlarged
    for i, path in enumerate([big, *[data_dir / p for p in frame["path"][1:]]]):
        image, target = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        expected = presets.eval_transform(pre)(open_image_file(str(path)))
        assert torch.equal(presets.normalize(pre)(image), expected)
        assert int(target) == (0 if i < 4 else 1)


def _paths(data_dir: Path) -> list[str]:
    from imgclf.manifest import read_manifest

    return read_manifest(data_dir).sort_values("label")["path"].tolist()


def test_cache_workers_and_train_view_share_the_cache(tmp_path: Path) -> None:
    data_dir = make_data_dir(tmp_path / "d", CLASSES[:2], n_train=4, n_test=0)
    frame = pd.DataFrame({"path": _paths(data_dir), "label": [CLASSES[0]] * 4 + [CLASSES[1]] * 4})
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    dataset = data.DecodedImages(frame, data_dir, CLASSES[:2], pre.resize_size)
    dataset.fill_cache(num_workers=2)  # decoded in two worker processes
    assert dataset.cache is not None and len(dataset.cache) == 8
    assert all(torch.equal(dataset.cache[i], data.decode_resized(data_dir / p, pre.resize_size))
               for i, p in enumerate(frame["path"]))
    train_view = dataset.with_transform(presets.train_augment(pre, DataConfig().augment))
    assert train_view.cache is dataset.cache
    image, _ = train_view[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


def test_cache_bytes_estimates_shrunk_sizes(tiny_data_dir: Path) -> None:
    split = data.make_split(tiny_data_dir, 0.15, 0)
    need = data.cache_bytes(tiny_data_dir, split, resize_size=37)
    assert 72 * 3 * 28 * 28 <= need <= 72 * 3 * 29 * 29  # 28px images are kept as they are
    assert data.cache_bytes(tiny_data_dir, split, resize_size=14) <= 72 * 3 * 15 * 15

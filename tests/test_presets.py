"""presets.py: train and eval preprocessing defined once; Preprocessing round-trips as plain data."""

from __future__ import annotations

import torch
from helpers import CLASSES, demo_images

from imgclf import presets
from imgclf.config import AugmentConfig, DataConfig
from imgclf.images import open_image_file


def _image():
    return open_image_file(str(demo_images("train", CLASSES[0], 1)[0]))


def test_preprocessing_round_trips_as_plain_data() -> None:
    pre = presets.Preprocessing.from_config(DataConfig(image_size=64, crop_ratio=0.8))
    assert pre.resize_size == 80
    plain = pre.to_plain()
    assert all(isinstance(v, (int, float, str, list)) for v in plain.values())
    assert presets.Preprocessing.from_plain(plain) == pre


def test_eval_transform_is_resize_crop_then_normalize() -> None:
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    image = _image()
    resized = presets.eval_resize(pre)(image)
    assert resized.dtype == torch.uint8 and resized.shape == (3, 32, 32)
    full = presets.eval_transform(pre)(image)
    assert full.dtype == torch.float32
    assert torch.allclose(full, presets.normalize(pre)(resized))
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    assert torch.allclose(full, (resized.float() / 255 - mean) / std, atol=1e-6)


def test_normalize_works_on_batches_the_same_as_on_images() -> None:
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    together = presets.normalize(pre)(batch)
    assert torch.allclose(together[2], presets.normalize(pre)(batch[2]))


def test_train_augment_stays_uint8_and_varies() -> None:
    pre = presets.Preprocessing.from_config(DataConfig(image_size=32))
    augment = AugmentConfig(policy="trivialaugment", random_erasing=1.0)
    torch.manual_seed(0)
    outs = [presets.train_augment(pre, augment)(_image()) for _ in range(4)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert any((o == 0).all(dim=0).sum() > 0 for o in outs)  # erased (black) patches
    normalized = presets.train_transform(pre, AugmentConfig())(_image())
    assert normalized.dtype == torch.float32 and normalized.shape == (3, 32, 32)

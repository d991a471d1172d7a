"""The record-setters' tricks (train/_tricks.py, train/_optim.py): each one's rule, and all of them in a real run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from imgclf.config import AugmentConfig, OptimConfig, load_config
from imgclf.errors import ConfigError
from imgclf.stages import train
from imgclf.train import _optim, _tricks


def _flags(sampler: _tricks.AlternatingFlipSampler) -> dict[int, bool]:
    return dict(iter(sampler))


def test_alternating_flip_mirrors_every_image_in_every_other_epoch() -> None:
    sampler = _tricks.AlternatingFlipSampler(200, seed=1)
    epochs = [_flags(sampler) for _ in range(3)]
    for flags in epochs:
        assert sorted(flags) == list(range(200))  # each image once per epoch
    assert all(epochs[0][i] != epochs[1][i] and epochs[1][i] != epochs[2][i] for i in range(200))
    assert 70 < sum(epochs[0].values()) < 130  # the first epoch is a coin flip per image
    again = _tricks.AlternatingFlipSampler(200, seed=1)
    assert _flags(again) == epochs[0]  # seeded
    orders = [[i for i, _ in sampler] for _ in range(2)]
    assert orders[0] != orders[1]  # still shuffled anew each epoch


def test_flip_keyed_images_mirror_on_request_and_forward_the_rest() -> None:
    class Images(torch.utils.data.Dataset):
        failures = "the wrapped dataset's"

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3) + i, i

    keyed, sampler = _tricks.alternating_flip(Images(), None, seed=0)
    assert torch.equal(keyed[(1, True)][0], (torch.arange(6).reshape(1, 2, 3) + 1).flip(-1).to(torch.uint8))
    assert torch.equal(keyed[1][0], Images()[1][0])  # a plain index: unmirrored
    assert keyed.failures == "the wrapped dataset's" and len(keyed) == len(sampler) == 2


def test_progressive_size_grows_in_steps_to_full_size() -> None:
    augment = AugmentConfig(progressive_min_size=16, progressive_until=0.5)
    sizes = [_tricks.progressive_size(augment, 28, done) for done in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9)]
    assert sizes == [16, 16, 20, 24, 28, 28]
    assert _tricks.progressive_size(AugmentConfig(), 28, 0.0) == 28  # off
    batch = torch.randn(2, 3, 28, 28)
    assert _tricks.resize_batch(batch, 20).shape == (2, 3, 20, 20)
    assert _tricks.resize_batch(batch, 28) is batch


def test_identity_stem_passes_the_image_through() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    _tricks.identity_init(conv)
    image = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        out = conv(image)
    assert torch.allclose(out[:, :3], image, atol=1e-6)
    assert not torch.allclose(out[:, 3:6], image, atol=1e-2)  # the other filters keep their random init


def test_whitening_stem_decorrelates_patches() -> None:
    # Strongly correlated channels: the whitened outputs must have unit variance and no correlation.
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.randn(64, 1, 20, 20, generator=generator), 3, 1, 1)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn(64, 1, 20, 20, generator=generator),
                        torch.randn(64, 1, 20, 20, generator=generator)], 1)
    conv = nn.Conv2d(3, 64, 3, bias=False)
    assert _tricks.whitening_init(conv, images) == 54  # 27 patch dimensions, each with its negative
    with torch.no_grad():
        out = conv(images)[:, :27].permute(0, 2, 3, 1).reshape(-1, 27)
    covariance = out.T @ out / len(out)
    off_diagonal = covariance - torch.diag(covariance.diagonal())
    assert off_diagonal.abs().max() < 1e-3
    # Unit variance, less the share WHITEN_EPS takes from the weakest directions.
    assert covariance.diagonal().max() < 1.001 and covariance.diagonal().min() > 0.8
    assert torch.equal(conv.weight[27:54], -conv.weight[:27])


def test_stem_init_refuses_what_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="first layer is no dense 3-channel Conv2d"):
        _tricks.first_conv(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))
    with pytest.raises(ConfigError, match="has no centre"):
        _tricks.identity_init(nn.Conv2d(3, 8, 2))
    with pytest.raises(ConfigError, match="'model.stem_init'.*overwrite the pretrained"):
        load_config(None, ["model.stem_init=whiten", "model.pretrained=true"])
    with pytest.raises(ConfigError, match="data.augment.hflip"):
        load_config(None, ["data.augment.hflip=alternating"])


def test_lookahead_pulls_the_weights_halfway_back_every_k_steps() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = _optim.make_optimizer([{"params": [param]}], 1.0,
                                      OptimConfig(name="sgd", momentum=0.0, lookahead_steps=2), None)
    for _ in range(4):
        optimizer.zero_grad()
        param.sum().backward()  # gradient 1: plain SGD would be at -4 after four steps
        optimizer.step()
    # timm keeps its first slow copy at step k (-2), so the first pull is at step 2k: halfway from -2 to -4.
    assert param.item() == pytest.approx(-3.0)
    assert _optim.make_optimizer([{"params": [param]}], 1.0, OptimConfig(), None).__class__ is torch.optim.AdamW


def test_every_trick_together_trains_and_resumes(tiny_data_dir: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = tiny_config("trainer.epochs=1", "model.stem_init=whiten", "data.augment.hflip=alternate",
                         "data.augment.progressive_min_size=16", "optim.name=sgd", "optim.lr=0.05",
                         "optim.lookahead_steps=2", "loss.label_smoothing=0.1", "trainer.channels_last=true")
    with caplog.at_level(logging.INFO, logger="imgclf.train"):
        first = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    # resnet18's 7x7 stem: 147 patch dimensions, more than its 64 filters, so all are set.
    assert "stem_init whiten: 64 of 64 first-layer filters" in caplog.text
    state = torch.load(first.last_checkpoint, weights_only=True)["optimizer_states"][0]
    assert state["param_groups"][0]["lookahead_k"] == 2 and state["param_groups"][0]["nesterov"] is True
    caplog.clear()
    config = config.model_copy(update={"trainer": config.trainer.model_copy(update={"epochs": 2})})
    with caplog.at_level(logging.INFO, logger="imgclf.train"):
        resumed = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run", resume=True))
    assert resumed.epochs_run == 2
    assert "stem_init" not in caplog.text  # a resumed run keeps its trained first layer


def test_the_ablation_variants_are_valid_configs() -> None:
    # benchmarks/fashion_mnist_tricks.py: a typo in a variant would only show after an hour of other runs.
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fashion_mnist_tricks as ablation

    for name, overrides in ablation.VARIANTS.items():
        config = load_config(ablation.BASE_CONFIG, ablation.fixed_budget(4, 1) + overrides)
        assert config.trainer.epochs == 4 and config.trainer.precision == "32", name
    assert load_config(ablation.BASE_CONFIG, ablation.VARIANTS["all"]).model.stem_init == "whiten"

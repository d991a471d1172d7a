"""Training recipe (issue 14): learning-rate finder, MixUp/CutMix, test-time augmentation, fine-tuning
from pretrained weights (a local state dict, and torch hub's cache with no network), small-input
stems and the model list. Every training here is real (3 classes of Fashion-MNIST PNGs, seconds).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import tiny_config
from PIL import Image

from imgclf import checkpoint, models
from imgclf.cli import main
from imgclf.config import load_config
from imgclf.errors import ConfigError
from imgclf.inference import _tta
from imgclf.manifest import read_manifest, usable_rows
from imgclf.presets import eval_transform
from imgclf.rundir import LR_FIND_JSON, LR_FIND_PNG
from imgclf.stages import evaluate, train
from imgclf.train import _mix
from imgclf.train._lr_find import MAX_LR, MIN_LR
from imgclf.train._module import ImageClassifier

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "configs" / "finetune_photos.yaml"


# ---- learning-rate finder ------------------------------------------------------------------------
def test_lr_find_writes_its_curve_and_a_finite_suggestion(tiny_data_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "find"
    code = main(["train", "--data", str(tiny_data_dir), "--out", str(run_dir), "--lr-find",
                 "trainer.batch_size=16", "data.image_size=32", "data.num_workers=0", "model.arch=resnet18",
                 "trainer.progress_bar=false", "optim.lr_find_steps=25"])
    assert code == 0
    found = json.loads((run_dir / LR_FIND_JSON).read_text())
    assert found["steps"] == len(found["lrs"]) == len(found["losses"]) and found["steps"] >= 15
    assert found["lrs"] == sorted(found["lrs"]) and found["lrs"][0] == pytest.approx(MIN_LR)
    suggestion = found["suggestion"]
    assert suggestion is not None and math.isfinite(suggestion) and MIN_LR <= suggestion <= MAX_LR
    assert f"optim.lr={suggestion:.3g}" in capsys.readouterr().out
    with Image.open(run_dir / LR_FIND_PNG) as im:
        assert im.format == "PNG" and im.width >= 600
    # Only the finder ran: nothing a training run or evaluate would mistake for a run.
    assert sorted(p.name for p in run_dir.iterdir()) == [LR_FIND_JSON, LR_FIND_PNG]


def test_lr_find_then_train_with_its_suggestion(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("optim.lr=find", "optim.lr_find_steps=20", "trainer.epochs=1", "optim.warmup_epochs=0",
                         "optim.schedule=constant")
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    suggestion = json.loads((tmp_path / "run" / LR_FIND_JSON).read_text())["suggestion"]
    assert math.isfinite(suggestion)
    assert config.optim.lr == "find"  # the caller's config is left as it was
    assert load_config(tmp_path / "run" / "config.yaml").optim.lr == pytest.approx(suggestion)
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(suggestion)
    assert ckpt["imgclf"]["config"]["optim"]["lr"] == pytest.approx(suggestion)
    assert not list((tmp_path / "run").glob(".lr_find*"))  # the finder's scratch checkpoint is gone


def test_lr_find_refuses_several_devices_before_anything_is_written(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("optim.lr=find", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="one device"):
        train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---- MixUp / CutMix ------------------------------------------------------------------------------
def test_soft_cross_entropy_of_one_hot_targets_is_the_hard_loss() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(12, 4), torch.randint(0, 4, (12,))
    weight = torch.tensor([0.5, 1.0, 2.0, 3.0])
    one_hot = torch.nn.functional.one_hot(targets, 4).float()
    for w in (None, weight):
        hard = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, targets)
        assert _mix.cross_entropy(logits, one_hot, w, 0.1) == pytest.approx(float(hard), rel=1e-6)
    # A 50/50 mix of two labels costs the mean of the two losses (no weights, no smoothing).
    soft = 0.5 * one_hot + 0.5 * one_hot.roll(1, 0)
    both = 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                  + torch.nn.functional.cross_entropy(logits, targets.roll(1, 0)))
    assert _mix.cross_entropy(logits, soft) == pytest.approx(float(both), rel=1e-6)


def test_mixing_trains_on_soft_targets_while_validation_uses_hard_labels(tiny_data_dir: Path,
                                                                        tmp_path: Path) -> None:
    config = tiny_config("data.augment.mixup=0.8", "data.augment.cutmix=1.0", "loss.label_smoothing=0.1",
                         "loss.class_weights=balanced")
    # One training step, by hand: the loss is the soft-target loss of the mixed batch.
    module = ImageClassifier(models.create_model("resnet18", 3), config, ["a", "b", "c"],
                             _pre(config), torch.tensor([1.0, 2.0, 0.5]))
    images, targets = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2] * 2 + [0, 1])
    torch.manual_seed(3)
    mixed, soft = module.mixer(module.normalize(images), targets)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.equal(soft, torch.nn.functional.one_hot(targets, 3).float())
    torch.manual_seed(3)
    loss = module.training_step((images, targets), 0)
    expected = _mix.cross_entropy(module.model(module._layout(mixed)), soft, module.criterion.weight, 0.1)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)

    # A real run: validation accuracy is computed on hard labels, as evaluate computes it.
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert math.isfinite(history.iloc[-1]["train_loss"])
    # The run directory evaluates its best checkpoint: the first epoch with the top val_f1_macro (the monitor).
    best = history.loc[history["val_f1_macro"].idxmax()]
    assert best["val_f1_macro"] == pytest.approx(result.best_score, abs=1e-6)
    metrics = evaluate.run(evaluate.EvaluateOptions(model=tmp_path / "run", split="val", out=tmp_path / "eval",
                                                    bootstrap_resamples=50, baseline_simulations=50))
    assert metrics["split"] == "val" and metrics["n_images"] == 12
    assert best["val_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert best["val_f1_macro"] == pytest.approx(metrics["f1_macro"], abs=1e-6)


def _pre(config):  # noqa: ANN001, ANN202 - a test shortcut
    from imgclf.presets import Preprocessing

    return Preprocessing.from_config(config.data)


def test_mixing_is_off_unless_configured() -> None:
    assert _mix.make_mixer(tiny_config().data.augment, 3) is None
    assert _mix.make_mixer(tiny_config("data.augment.cutmix=1.0", "data.augment.mix_prob=0").data.augment, 3) is None
    with pytest.raises(ConfigError, match="data.augment.mixup"):
        tiny_config("data.augment.mixup=-1")


# ---- test-time augmentation ----------------------------------------------------------------------
def test_tta_views_are_the_same_for_numpy_and_torch_batches() -> None:
    batch = torch.randn(2, 3, 32, 32)
    for mode, n in (("none", 1), ("flip", 2), ("crops", 10)):
        from_torch = _tta.views(batch, mode)
        from_numpy = _tta.views(batch.numpy(), mode)
        assert len(from_torch) == len(from_numpy) == n == _tta.PASSES[mode]
        for t, a in zip(from_torch, from_numpy, strict=True):
            assert t.shape == batch.shape and np.array_equal(t.numpy(), a)
    mirror = _tta.views(batch, "flip")[1]
    assert torch.equal(mirror[..., 0], batch[..., -1])
    shifted = _tta.views(batch, "crops")[2]  # moved up-left by 2 px: row 0 is the reflection of row 2
    assert torch.equal(shifted[..., 2:, 2:], batch[..., :-2, :-2]) and torch.equal(shifted[..., 0, 2:],
                                                                                  batch[..., 2, :-2])
    with pytest.raises(ConfigError, match="--tta"):
        _tta.views(batch, "flop")


def test_evaluate_with_flip_tta_averages_the_mirror_image_and_records_it(tiny_run: Path, tiny_data_dir: Path,
                                                                        tmp_path: Path) -> None:
    plain = evaluate.run(evaluate.EvaluateOptions(model=tiny_run, out=tmp_path / "plain", bootstrap_resamples=50,
                                                  baseline_simulations=50))
    code = main(["evaluate", "--model", str(tiny_run), "--out", str(tmp_path / "flip"), "--tta", "flip",
                 "--no-progress"])
    assert code == 0
    flipped = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert plain["tta"] == "none" and flipped["tta"] == "flip"
    # Independently: the mean of the model's probabilities for each test image and its mirror image.
    loaded = checkpoint.load_model(tiny_run)
    test = usable_rows(read_manifest(tiny_data_dir), "test")
    transform = eval_transform(loaded.preprocessing)
    batch = torch.stack([transform(Image.open(tiny_data_dir / p).convert("RGB")) for p in test["path"]])
    with torch.no_grad():
        proba = (torch.softmax(loaded.model(batch).double(), 1) + torch.softmax(loaded.model(batch.flip(-1)).double(),
                                                                                  1)) / 2
    confidence = pd.read_csv(tmp_path / "flip" / "predictions.csv")["confidence"].to_numpy()
    assert confidence == pytest.approx(proba.max(1).values.numpy(), rel=1e-5)
    assert not np.allclose(confidence, pd.read_csv(tmp_path / "plain" / "predictions.csv")["confidence"])
    assert flipped["log_loss"] != plain["log_loss"]


def test_predict_tta_changes_the_probabilities(tiny_run: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    images = [str(tiny_data_dir / p) for p in usable_rows(read_manifest(tiny_data_dir), "test")["path"][:6]]
    rows = {}
    for mode in ("none", "flip", "crops"):
        out = tmp_path / f"{mode}.csv"
        assert main(["predict", "--model", str(tiny_run), "--tta", mode, "-o", str(out), "--no-progress",
                     *images]) == 0
        rows[mode] = pd.read_csv(out)["probability_1"].to_numpy()
    assert not np.allclose(rows["none"], rows["flip"]) and not np.allclose(rows["flip"], rows["crops"])


# ---- fine-tuning from pretrained weights ---------------------------------------------------------
def _finetune(*extra: str):  # noqa: ANN202 - a TrainConfig
    """The bundled fine-tuning config, shrunk to seconds: 32 px, 2 epochs (1 frozen), tiny batches."""
    return load_config(FINETUNE, ["data.image_size=32", "trainer.epochs=2", "model.freeze_backbone_epochs=1",
                                  "trainer.batch_size=16", "data.num_workers=0", "trainer.progress_bar=false",
                                  *extra])


def test_finetune_config_is_valid_and_says_what_it_does() -> None:
    config = load_config(FINETUNE)
    assert config.model.pretrained and config.data.image_size == 224
    assert config.model.head_init == "probe" and config.model.bn_frozen and config.optim.backbone_lr_mult < 1
    assert "finetune_photos.yaml" in (REPO / "README.md").read_text()


def test_finetune_from_a_local_state_dict_trains_head_first_then_the_backbone_slower(tiny_data_dir: Path,
                                                                                    tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet_like = torchvision.models.mobilenet_v3_large()  # 1,000 classes: its head cannot fit 3
    path = tmp_path / "backbone.pth"
    torch.save(imagenet_like.state_dict(), path)
    stem = imagenet_like.features[0][0].weight

    frozen = train.run(train.TrainOptions(_finetune("trainer.epochs=1", f"model.weights={path}"), tiny_data_dir,
                                          tmp_path / "frozen"))
    state = checkpoint.load_model(frozen.last_checkpoint).model.state_dict()
    assert torch.equal(state["features.0.0.weight"], stem)  # loaded, and untouched while frozen
    assert state["classifier.3.weight"].shape == (3, 1280)  # a new head for 3 classes

    result = train.run(train.TrainOptions(_finetune(f"model.weights={path}"), tiny_data_dir, tmp_path / "run"))
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 4  # head and backbone, each with and without weight decay
    assert all(group["fused"] is True for group in groups)  # AdamW's one-kernel step on CPU
    assert groups[2]["initial_lr"] == pytest.approx(groups[0]["initial_lr"] * 0.1)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert not torch.equal(trained["features.0.0.weight"], stem)  # unfrozen in the second epoch


def test_pretrained_true_loads_torch_hubs_cache_without_network(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A cache filled beforehand (here from a locally initialised model) is what torchvision's own
    loader reads: torch.hub checks the file-name hash only when it downloads."""
    weights = torchvision.models.get_model_weights("mobilenet_v3_large").DEFAULT
    torch.manual_seed(1)
    local = torchvision.models.mobilenet_v3_large()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(local.state_dict(), cached)
    dead = "http://127.0.0.1:9"  # any download attempt fails at once
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def train_cli(run_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "imgclf", "train", "--config", str(FINETUNE), "--data", str(tiny_data_dir),
               "--out", str(run_dir), "data.image_size=32", "trainer.epochs=1", "trainer.batch_size=16",
               "data.num_workers=0", "trainer.progress_bar=false", f"model.cache_dir={cache_dir}",
               "model.freeze_backbone_epochs=1"]  # a frozen epoch: the backbone stays as cached, to compare
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, tmp_path / "torch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Downloading" not in proc.stdout + proc.stderr
    state = checkpoint.load_model(run_dir).model.state_dict()
    assert torch.equal(state["features.0.0.weight"], local.features[0][0].weight)  # frozen epoch: as cached
    assert torch.equal(state["features.5.block.0.0.weight"], local.features[5].block[0][0].weight)

    # An empty cache: the one-line offline error naming model.weights, and no run directory.
    proc = train_cli(tmp_path / "offline", tmp_path / "empty")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.weights" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "offline").exists()


# ---- small-input stems and the model list --------------------------------------------------------
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_small_input_halves_the_stem_downsampling(arch: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    sides = {}
    for small in (False, True):
        model = models.create_model(arch, 3, small_input=small).eval()
        stem = (torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool) if arch.startswith("resnet")
                else model.features[0])
        with torch.no_grad():
            assert model(x).shape == (2, 3)
            sides[small] = stem(x).shape[-1]
    assert sides[True] == 2 * sides[False]


def test_small_input_checkpoints_reload_with_their_stem(tiny_data_dir: Path, tmp_path: Path) -> None:
    result = train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "model.small_input=true"), tiny_data_dir,
                                          tmp_path / "run"))
    loaded = checkpoint.load_model(result.run_dir)
    assert loaded.model.conv1.kernel_size == (3, 3) and loaded.model.conv1.stride == (1, 1)
    with pytest.raises(ConfigError, match="small_input"):
        models.create_model("timm/resnet18d", 3, small_input=True)  # a deep 3-conv stem: refused


def test_small_input_for_a_timm_resnet_halves_its_stem_downsampling() -> None:
    x = torch.randn(2, 3, 32, 32)
    sides = {}
    for small in (False, True):
        model = models.create_model("timm/resnet18", 3, small_input=small,
                                    timm_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 3)
            sides[small] = model.maxpool(model.act1(model.bn1(model.conv1(x)))).shape[-1]
    assert sides == {False: 8, True: 16}


def test_models_command_lists_every_architecture_with_measured_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for arch in models.ARCHITECTURES:
        params, train_speed, infer_speed = models.MEASURED[arch]
        assert params > 0 and train_speed > 0 and infer_speed > train_speed
        line = next(line for line in out.splitlines() if line.startswith(arch + " "))
        assert f"{params / 1e6:.1f}M" in line
    assert "timm/<name>" in out and models.MEASURED_ON in out

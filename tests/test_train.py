"""train stage: the run-directory contract, resume after SIGKILL, reproducibility, DDP, options.

Every training here is real: 3 classes of real Fashion-MNIST PNGs at 32px, 1-4 epochs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from imgclf import checkpoint, models
from imgclf.config import TrainConfig, load_config
from imgclf.errors import ConfigError, DataError
from imgclf.presets import Preprocessing
from imgclf.stages import train
from imgclf.train import _inputs as train_inputs
from imgclf.train import _run as train_run
from imgclf.train._callbacks import METRIC_COLUMNS
from imgclf.train._module import ImageClassifier, _lr_factor

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", "train", *args]


def _env() -> dict[str, str]:
    # One intra-op thread per process: the DDP test runs two, and the machine has 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ---- the run-directory contract ------------------------------------------------------------------
def test_run_directory_contract(tiny_run: Path, tiny_data_dir: Path) -> None:
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["data_dir"] == str(tiny_data_dir.resolve())
    assert info["class_names"] == ["Ankle_boot", "Bag", "Coat"]
    assert info["best_checkpoint"] == "checkpoints/best.ckpt"
    assert info["status"] == "done" and info["epochs_run"] == 2 and "imgclf_version" in info

    assert load_config(tiny_run / "config.yaml") == tiny_config()

    split = pd.read_csv(tiny_run / "split.csv")
    assert list(split.columns) == ["row", "path", "label", "subset"]
    val_per_class = split[split["subset"] == "val"].groupby("label").size()
    assert val_per_class.to_dict() == {"Ankle_boot": 4, "Bag": 4, "Coat": 4}  # round(24 * 0.15)
    assert (split["subset"] == "train").sum() == 3 * 20

    metrics = pd.read_csv(tiny_run / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == [0, 1]
    assert metrics[["train_loss", "val_loss", "images_per_s", "epoch_seconds"]].gt(0).all().all()
    assert metrics["val_f1_macro"].between(0, 1).all()
    with Image.open(tiny_run / "curves.png") as im:
        assert im.format == "PNG" and im.width > 300


def test_checkpoints_follow_the_checkpoint_contract(tiny_run: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(tiny_run / "checkpoints" / name, map_location="cpu", weights_only=True)
        meta = ckpt["imgclf"]
        desc = checkpoint.describe(meta)
        assert desc.class_names == ["Ankle_boot", "Bag", "Coat"] and desc.arch == "resnet18"
        assert desc.preprocessing.image_size == 32
        assert all(k.startswith("model.") for k in ckpt["state_dict"])
    loaded = checkpoint.load_model(tiny_run)
    assert loaded.path.name == "best.ckpt"
    assert loaded.preprocessing == Preprocessing.from_config(tiny_config().data)
    with torch.no_grad():
        assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_best_checkpoint_is_the_best_val_f1_epoch(tiny_run: Path) -> None:
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    best = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == int(metrics["val_f1_macro"].idxmax())
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["best_score"] == pytest.approx(metrics["val_f1_macro"].max(), abs=1e-6)


def test_last_checkpoint_is_the_last_epoch_when_the_monitor_stops_improving(tiny_data_dir: Path,
                                                                            tmp_path: Path) -> None:
    # A learning rate of ~0 and frozen BatchNorm statistics: epoch 1 predicts what epoch 0 did, so
    # `best` stays at epoch 0. Lightning's own save_last would then leave last.ckpt at epoch 0 too.
    config = tiny_config("optim.lr=1e-12", "model.bn_momentum=1e-6", "trainer.monitor=val_accuracy")
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    assert torch.load(result.best_checkpoint, weights_only=True)["epoch"] == 0
    last = torch.load(result.last_checkpoint, weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 6)  # 2 epochs of 3 batches


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_run: Path, tiny_data_dir: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--resume"):
        train.run(train.TrainOptions(tiny_config(), tiny_data_dir, tiny_run))
    with pytest.raises(DataError, match="nothing to resume"):
        train.run(train.TrainOptions(tiny_config(), tiny_data_dir, tmp_path / "new", resume=True))


# ---- reproducibility ------------------------------------------------------------------------------
def test_same_seed_same_validation_metrics(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("trainer.epochs=1", "model.arch=mobilenet_v3_small")
    columns = ["train_loss", "val_loss", "val_accuracy", "val_f1_macro"]
    runs = [train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / f"r{i}")) for i in range(2)]
    first, second = (pd.read_csv(r.run_dir / "metrics.csv")[columns] for r in runs)
    pd.testing.assert_frame_equal(first, second)
    a, b = (torch.load(r.best_checkpoint, weights_only=True)["state_dict"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "model.arch=mobilenet_v3_small", "seed=7"),
                                         tiny_data_dir, tmp_path / "other"))
    c = torch.load(other.best_checkpoint, weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---- resume after SIGKILL (a real process, really killed) ---------------------------------------
def _epochs_in(last: Path) -> int:
    try:
        return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # being written right now
        return -1


def test_resume_after_sigkill(tiny_data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--data", str(tiny_data_dir), "--out", str(run_dir), "trainer.epochs=4", "trainer.batch_size=16",
            "data.image_size=32", "data.num_workers=0", "trainer.progress_bar=false",
            "model.arch=mobilenet_v3_small"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and _epochs_in(last) >= 1:  # saved after epoch 1 of 0..3: mid-run
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-500:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _epochs_in(last)
    assert 1 <= killed_at < 3

    # Resume through the CLI without --config: it must reuse RUN_DIR/config.yaml (4 epochs, 32px).
    done = subprocess.run(_cli("--data", str(tiny_data_dir), "--out", str(run_dir), "--resume"),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1, 2, 3]  # no epoch lost, none duplicated
    assert torch.load(last, weights_only=True)["epoch"] == 3
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    assert checkpoint.load_model(run_dir).preprocessing.image_size == 32


def test_sigterm_stops_training_after_the_current_batch_and_the_run_resumes(tiny_data_dir: Path,
                                                                            tmp_path: Path) -> None:
    # What `docker stop` or a batch scheduler sends: the run must stop soon, say so, and resume.
    run_dir = tmp_path / "run"
    args = ["--data", str(tiny_data_dir), "--out", str(run_dir), "trainer.epochs=30", "trainer.batch_size=16",
            "data.image_size=32", "data.num_workers=0", "trainer.progress_bar=false",
            "model.arch=mobilenet_v3_small"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None and _epochs_in(last) < 0:
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before the signal: {proc.stderr.read()[-500:]!r}"
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)  # 30 epochs would take minutes
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-1500:]
    assert "interrupted" in stderr.splitlines()[-1]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    stopped_at = _epochs_in(last)
    assert 0 <= stopped_at < 29

    done = subprocess.run(_cli("--data", str(tiny_data_dir), "--out", str(run_dir), "--resume",
                               f"trainer.epochs={stopped_at + 2}"),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    # Epochs after the last checkpoint are trained again, their metrics rows replaced, not doubled.
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == list(range(stopped_at + 2))


# ---- DDP: 2 CPU processes (gloo) -------------------------------------------------------------------
def test_ddp_two_cpu_processes(tiny_data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    weights = tmp_path / "backbone.pth"  # a backbone with weights of its own: only such a one is frozen
    torch.save(models.create_model("mobilenet_v3_small", 3).state_dict(), weights)
    args = ["--data", str(tiny_data_dir), "--out", str(run_dir), "trainer.epochs=1", "trainer.batch_size=8",
            "data.image_size=32", "data.num_workers=0", "trainer.progress_bar=false",
            "model.arch=mobilenet_v3_small", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp",
            # Both leave parameters without gradients, which plain DDP refuses: they must work.
            "trainer.ema=true", "model.freeze_backbone_epochs=1", f"model.weights={weights}"]
    done = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["imgclf"]["class_names"] == ["Ankle_boot", "Bag", "Coat"]
    # 60 training images over 2 ranks of batch 8: 3 full batches per rank (drop_last), 1 epoch.
    assert ckpt["global_step"] == 3
    assert checkpoint.load_model(run_dir).model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [0]


# ---- options -------------------------------------------------------------------------------------
def test_options_together_train_and_save_ema_weights(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("model.arch=mobilenet_v3_small", "model.freeze_backbone_epochs=1",
                         "data.balanced_sampler=true", "loss.class_weights=balanced",
                         "loss.label_smoothing=0.1", "optim.name=sgd", "optim.lr=0.05",
                         "optim.schedule=onecycle", "optim.grad_clip=1.0", "trainer.ema=true",
                         "trainer.ema_decay=0.9", "data.augment.policy=trivialaugment",
                         "data.augment.random_erasing=0.5", "data.cache=false")
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    state = ckpt["state_dict"]
    # The shipped weights are the EMA ones; the raw weights are kept (under raw.) to resume.
    raw = {k.removeprefix("raw."): v for k, v in state.items() if k.startswith("raw.")}
    shipped = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    assert raw.keys() == shipped.keys()
    assert any(not torch.equal(raw[k], shipped[k]) for k in raw if raw[k].is_floating_point())
    loaded = checkpoint.load_model(result.last_checkpoint)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in shipped.items())
    assert ckpt["optimizer_states"][0]["param_groups"][0]["momentum"] == 0.9  # SGD


def test_freeze_backbone_trains_only_the_head(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("trainer.epochs=1", "model.freeze_backbone_epochs=1", "trainer.batch_size=32")
    before = _initial_state(config)
    weights = tmp_path / "backbone.pth"  # only a backbone with weights of its own is frozen
    torch.save(before, weights)
    config = tiny_config("trainer.epochs=1", "model.freeze_backbone_epochs=1", "trainer.batch_size=32",
                         f"model.weights={weights}")
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    after = {k.removeprefix("model."): v for k, v in
             torch.load(result.last_checkpoint, weights_only=True)["state_dict"].items()}
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])  # backbone frozen
    assert not torch.equal(after["fc.weight"], before["fc.weight"])   # head trained


def _initial_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights train.run starts from: same seed, same factory."""
    import lightning.pytorch as pl

    from imgclf.models import create_model

    pl.seed_everything(config.seed, verbose=False)
    return {k: v.clone() for k, v in create_model(config.model.arch, 3).state_dict().items()}


def test_pretrained_offline_fails_with_one_line_pointing_to_model_weights(tiny_data_dir: Path,
                                                                          tmp_path: Path) -> None:
    config = tiny_config("model.pretrained=true", f"model.cache_dir={tmp_path / 'hub'}")
    with pytest.raises(ConfigError) as err:
        train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    message = str(err.value)
    assert "model.weights" in message and "\n" not in message


def test_weights_file_is_loaded_with_weights_only(tiny_run: Path, tiny_data_dir: Path,
                                                  tmp_path: Path) -> None:
    backbone = {k.removeprefix("model."): v for k, v in
                torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"].items()}
    path = tmp_path / "resnet18_backbone.pth"
    torch.save(backbone, path)
    config = tiny_config("trainer.epochs=1", f"model.weights={path}", "model.freeze_backbone_epochs=1")
    result = train.run(train.TrainOptions(config, tiny_data_dir, tmp_path / "run"))
    after = torch.load(result.last_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(after["model.layer1.0.conv1.weight"], backbone["layer1.0.conv1.weight"])

    pickled = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": backbone["conv1.weight"], "note": Path("not/plain/data")}, pickled)
    with pytest.raises(ConfigError, match="model.weights"):
        train.run(train.TrainOptions(tiny_config(f"model.weights={pickled}"), tiny_data_dir, tmp_path / "bad"))


def test_auto_bn_momentum_fits_steps_per_epoch() -> None:
    assert train.auto_bn_momentum(10_000) == pytest.approx(0.1)
    assert train.auto_bn_momentum(40) == pytest.approx(1 - 0.01 ** (1 / 40))  # ~0.11
    assert train.auto_bn_momentum(2) == 0.5
    from imgclf.models import create_model

    model = create_model("mobilenet_v3_small", 3)
    train_run._tune_batchnorm(model, tiny_config("model.arch=mobilenet_v3_small"), steps_per_epoch=40)
    moms = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert moms and all(m == pytest.approx(1 - 0.01 ** (1 / 40)) for m in moms)  # 0.01 replaced everywhere
    kept = create_model("mobilenet_v3_small", 3)
    train_run._tune_batchnorm(kept, tiny_config("model.bn_momentum=library"), steps_per_epoch=40)
    assert {m.momentum for m in kept.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_collapse_to_one_class_is_warned_when_it_persists(caplog: pytest.LogCaptureFixture) -> None:
    from imgclf.models import create_model

    config = tiny_config()
    module = ImageClassifier(create_model("resnet18", 3), config, ["a", "b", "c"],
                             Preprocessing.from_config(config.data))
    one_class, spread = torch.tensor([1.0, 30.0, 0.0]), torch.tensor([10.0, 12.0, 9.0])
    with caplog.at_level("INFO", logger="imgclf.train"):
        module._warn_if_collapsed(one_class, epoch=0)  # warming up: noted, not alarming
        assert [r.levelname for r in caplog.records] == ["INFO"] and "'b'" in caplog.text
        caplog.clear()
        module._warn_if_collapsed(one_class, epoch=1)  # still one class: the BatchNorm trap
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "collapsed to one class" in caplog.text and "bn_momentum" in caplog.text
        caplog.clear()
        module._warn_if_collapsed(spread, epoch=2)
        module._warn_if_collapsed(one_class, epoch=4)  # not consecutive: info again
        assert [r.levelname for r in caplog.records] == ["INFO"]
    assert module.collapsed_epochs == [0, 1, 4]

    # At the end of training: a collapsed last epoch that was only noted gets its warning.
    for collapsed, epochs, warned in (([0], 1, True), ([0, 1], 2, False), ([0], 3, False), ([1, 4], 5, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="imgclf.train"):
            train_run._warn_if_ended_collapsed(collapsed, epochs)
        assert bool(caplog.records) == warned, (collapsed, epochs)


def test_balanced_class_weights() -> None:
    split = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2 + ["c"], "subset": ["train"] * 8 + ["val"]})
    weights = train_inputs.class_weights(tiny_config("loss.class_weights=balanced"), split, ["a", "b", "c"])
    assert weights.tolist() == pytest.approx([8 / (3 * 6), 8 / (3 * 2), 1.0])  # c: not in train
    assert train_inputs.class_weights(tiny_config(), split, ["a", "b", "c"]) is None


class _FakeProgress:
    def __init__(self) -> None:
        self.done = 0.0

    def progress(self, step: int, total: int) -> float:
        return max(step / total, self.done)


def test_lr_schedule_warmup_then_anneal_by_steps_or_time() -> None:
    fake = _FakeProgress()
    cosine = _lr_factor(fake, "cosine", total=100, warmup=10)  # type: ignore[arg-type]
    assert cosine(0) == pytest.approx(1 / 11) and cosine(9) == pytest.approx(10 / 11)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-9)
    fake.done = 1.0  # the time budget is spent: annealed whatever the step
    assert cosine(20) == pytest.approx(0.0, abs=1e-9)
    onecycle = _lr_factor(_FakeProgress(), "onecycle", total=100, warmup=10)  # type: ignore[arg-type]
    assert onecycle(55) == pytest.approx(0.5)
    assert _lr_factor(_FakeProgress(), "constant", 100, 10)(90) == 1.0  # type: ignore[arg-type]


def test_default_yaml_documents_every_key_with_the_defaults() -> None:
    assert load_config(REPO / "configs" / "default.yaml") == TrainConfig()
    for name in ("demo.yaml", "fashion_mnist.yaml"):
        assert load_config(REPO / "configs" / name).model.arch == "mobilenet_v3_small"
    text = (REPO / "configs" / "default.yaml").read_text()
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            key = line.split(":")[0].strip()
            assert "#" in line, f"undocumented key {key!r}"


def test_cpu_threads_leave_room_for_loader_workers() -> None:
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        train_run._set_cpu_threads(tiny_config("data.num_workers=1", "trainer.accelerator=cpu"))
        assert torch.get_num_threads() == max(1, cores - 1)
        train_run._set_cpu_threads(tiny_config("trainer.cpu_threads=3", "trainer.accelerator=cpu"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="cpu_threads"):
        tiny_config("trainer.cpu_threads=0")


def test_missing_manifest_fails_before_creating_the_run_dir(tmp_path: Path) -> None:
    (tmp_path / "no_data").mkdir()  # a folder without a manifest (a missing folder is named as such)
    with pytest.raises(DataError, match="no manifest"):
        train.run(train.TrainOptions(tiny_config(), tmp_path / "no_data", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("labels, message", [
    (["Bag"] * 4, "at least 2 classes"),            # one class: nothing to tell apart
    ([], "no downloaded images with split 'train'"),  # every row failed to download
])
def test_unusable_data_fails_before_creating_the_run_dir(tmp_path: Path, tiny_data_dir: Path,
                                                         labels: list[str], message: str) -> None:
    from imgclf.manifest import read_manifest, write_manifest

    manifest = read_manifest(tiny_data_dir)
    train_rows = manifest[manifest["split"] == "train"].head(len(labels)).assign(label=labels)
    failed = manifest.head(3).assign(status="http_error", path="")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_manifest(pd.concat([train_rows, failed], ignore_index=True), data_dir)
    with pytest.raises(DataError, match=message):
        train.run(train.TrainOptions(tiny_config(), data_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, said", [("trainer.strategy=foo", "invalid strategy name"),
                                             ("trainer.devices=abc", "devices"),
                                             ("trainer.accelerator=mps", "accelerator=mps")])
def test_a_device_request_lightning_refuses_is_a_config_error_before_the_run_dir(
        tmp_path: Path, tiny_data_dir: Path, override: str, said: str) -> None:
    with pytest.raises(ConfigError, match=said) as exc:
        train.run(train.TrainOptions(tiny_config(override), tiny_data_dir, tmp_path / "run"))
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_architecture_is_refused_and_keeps_the_config(tiny_run: Path, tiny_data_dir: Path,
                                                                           tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="model.arch=resnet18, resumed with mobilenet_v3_small"):
        train.run(train.TrainOptions(tiny_config("model.arch=mobilenet_v3_small"), tiny_data_dir, run_dir, resume=True))
    assert (run_dir / "config.yaml").read_text() == before


def test_a_fresh_run_replaces_a_split_left_by_an_attempt_that_died_early(tiny_data_dir: Path,
                                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What an attempt on other data leaves when killed before its first checkpoint.
    pd.DataFrame({"row": [0, 1], "path": ["gone/a.png", "gone/b.png"], "label": ["x", "y"],
                  "subset": ["train", "val"]}).to_csv(run_dir / "split.csv", index=False)
    train.run(train.TrainOptions(tiny_config("trainer.epochs=1"), tiny_data_dir, run_dir))
    split = pd.read_csv(run_dir / "split.csv")
    assert not split["path"].str.startswith("gone/").any()
    assert sorted(split["label"].unique()) == ["Ankle_boot", "Bag", "Coat"]


def test_resume_of_an_ema_run_trains_the_raw_weights_and_keeps_averaging(tiny_data_dir: Path,
                                                                         tmp_path: Path) -> None:
    ema = ("trainer.ema=true", "trainer.ema_decay=0.5")
    run_dir = tmp_path / "ema"
    first = train.run(train.TrainOptions(tiny_config("trainer.epochs=1", *ema), tiny_data_dir, run_dir))
    saved = torch.load(first.last_checkpoint, weights_only=True)

    # What --resume loads: the raw weights go back into the trained model, the average into the EMA.
    config = tiny_config("trainer.epochs=2", *ema)
    module = ImageClassifier(models.create_model("resnet18", 3), config, first.class_names,
                             Preprocessing.from_config(config.data))
    module.on_load_checkpoint(saved)
    module.load_state_dict(saved["state_dict"])
    raw = torch.load(first.last_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(v, raw["raw." + k]) for k, v in module.model.state_dict().items())
    assert all(torch.equal(v, raw["model." + k]) for k, v in module.ema.module.state_dict().items())

    second = train.run(train.TrainOptions(config, tiny_data_dir, run_dir, resume=True))
    resumed = torch.load(second.last_checkpoint, weights_only=True)
    assert resumed["global_step"] == 2 * saved["global_step"]
    # One EMA update per step over both sessions: the average was not restarted on resume.
    assert int(resumed["state_dict"]["ema.n_averaged"]) == resumed["global_step"]
    assert pd.read_csv(run_dir / "metrics.csv")["epoch"].tolist() == [0, 1]


def test_compile_trains_and_saves_plain_state_dict_keys(tiny_data_dir: Path, tmp_path: Path) -> None:
    # torch.compile on CPU (inductor, a C++ compiler): slow to start (~30 s), so one tiny epoch.
    result = train.run(train.TrainOptions(tiny_config("trainer.epochs=1", "trainer.compile=true"), tiny_data_dir,
                                          tmp_path / "run"))
    state = torch.load(result.best_checkpoint, weights_only=True)["state_dict"]
    assert "model.conv1.weight" in state and not any("_orig_mod" in k for k in state)
    loaded = checkpoint.load_model(result.run_dir)  # a plain, uncompiled model
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert pd.read_csv(result.run_dir / "metrics.csv")["val_f1_macro"].between(0, 1).all()


# ---- learning-rate finder: the curve and the suggestion -------------------------------------------
def _synthetic_range_test(seed: int = 0) -> tuple[list[float], list[float]]:
    """100 steps from 1e-6 to 1: flat at ln(10) until ~1e-3, a fall between 3e-3 and 1e-2, divergence past 0.1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lrs = np.logspace(-6, 0, 100)
    x = np.log10(lrs)
    fall = 1.8 / (1 + np.exp(-(x - np.log10(5.5e-3)) / 0.08))
    rise = np.where(x > -1, 8.0 * (x + 1) ** 2, 0.0)
    losses = np.log(10) - fall + rise + rng.normal(0, 0.05, len(x))
    return lrs.tolist(), losses.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lr_finder_suggests_the_steep_descent_of_a_known_curve(seed: int) -> None:
    from imgclf.train import _lr_find

    lrs, raw = _synthetic_range_test(seed)
    smoothed = _lr_find.smooth(raw)
    assert smoothed[0] == raw[0]  # the first point is the loss measured, not a biased average
    suggestion = _lr_find.suggest(lrs, smoothed)
    assert suggestion is not None and 3e-3 <= suggestion <= 1e-2
    # Lightning's smoothing (running average, bias correction one step ahead) starts at half the loss.
    avg, lightning = 0.0, []
    for step, loss in enumerate(raw, start=1):
        avg = 0.98 * avg + 0.02 * loss
        lightning.append(avg / (1 - 0.98 ** (step + 1)))
    assert lightning[0] == pytest.approx(raw[0] * 0.02 / (1 - 0.98 ** 2))  # 0.505 x the measured loss
    assert _lr_find.suggest(lrs, [math.log(10)] * 100) is None  # a flat curve suggests nothing


def test_lr_finder_records_the_measured_loss_from_the_first_step(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = tiny_config("optim.lr_find_steps=20", "trainer.batch_size=8")
    result = train.find_lr(train.TrainOptions(config, tiny_data_dir, tmp_path / "find"))
    assert len(result.raw_losses) == len(result.losses) == len(result.lrs) == result.steps >= 15
    assert result.losses[0] == result.raw_losses[0]
    # A fresh 3-class head at the smallest LR: about ln 3 (a random init, so within a factor of 2).
    assert math.log(3) / 2 < result.losses[0] < math.log(3) * 2

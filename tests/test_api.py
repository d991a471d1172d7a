"""The Python API: the README's example runs as written, and the API's own rules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import demo_images
from PIL import Image

import imgclf
from imgclf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- api-example -->\s*```python\n(.*?)```", text, flags=re.S)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    examples = readme_examples()
    assert examples, "README.md lost its <!-- api-example --> block"
    for name in ("src", "configs"):  # the example's paths are relative to the repository root
        (tmp_path / name).symlink_to(ROOT / name)
    script = tmp_path / "example.py"
    script.write_text("\n".join(examples))
    env = {**os.environ, "IMGCLF_NO_BARS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("F1-macro ") and "weighted random" in lines[0]
    assert lines[1].split()[0] in imgclf.load(tmp_path / "nb_runs" / "r1").class_names
    assert lines[2].endswith(", None]")  # the bytes that are not an image: no label, no exception
    assert (tmp_path / "nb_runs" / "r1" / "model.onnx").is_file()
    assert (tmp_path / "nb_runs" / "r1" / "metrics.json").is_file()


def test_run_and_model(tiny_run: Path) -> None:
    run = imgclf.Run.open(tiny_run)
    assert run.best_checkpoint.is_file() and len(run.metrics) == run.epochs_run == 2
    model = run.load()
    assert model.class_names == run.class_names
    image = demo_images("test", run.class_names[0], 1)[0]
    from_path = model.predict(image)
    from_pil = model.predict(Image.open(image))
    from_array = model.predict(np.asarray(Image.open(image).convert("RGB")))
    from_bytes = model.predict(image.read_bytes())
    labels = {p.label for p in (from_path, from_pil, from_array, from_bytes)}
    assert len(labels) == 1 and labels <= set(run.class_names)
    assert from_path.probability == pytest.approx(from_bytes.probability, abs=1e-6)
    batch = model.predict([image, str(image), "missing.png", np.zeros((2, 2), np.float32)])
    assert [p.label is None for p in batch] == [False, False, True, True]
    assert [p.status for p in batch] == ["ok", "ok", "unreadable", "not_image"]
    assert "no such file" in batch[2].error.lower() and "uint8" in batch[3].error


def test_train_keywords_map_to_config_keys(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'name' is one of optim.name, loss.name"):
        imgclf.train(tiny_data_dir, tmp_path / "r", name="sgd")
    with pytest.raises(ConfigError, match="no config key"):
        imgclf.train(tiny_data_dir, tmp_path / "r", epochz=1)
    assert not (tmp_path / "r").exists()


def test_api_functions_are_plain_functions_with_signatures_and_docs() -> None:
    import importlib
    import inspect
    import pydoc

    from imgclf.stages import audit, download, train

    names = ("download", "audit", "train", "evaluate", "predict", "export", "load")
    for name in names:
        function = getattr(imgclf, name)
        assert inspect.isfunction(function), name
        params = inspect.signature(function).parameters
        assert len(params) >= 2 and not all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
        text = pydoc.render_doc(function, renderer=pydoc.plaintext)
        assert function.__doc__.splitlines()[0] in text and "package" not in text.splitlines()[0].lower()
    assert set(names) <= set(dir(imgclf)) and set(names) <= set(imgclf.__all__)  # tab completion
    assert list(inspect.signature(imgclf.train).parameters)[:3] == ["data", "out", "config"]
    # The stage packages stay importable; importing one leaves the API function in place.
    importlib.import_module("imgclf.evaluate")
    assert inspect.isfunction(imgclf.evaluate) and inspect.isfunction(imgclf.train)
    assert callable(train.run) and callable(download.run) and callable(audit.run)
    assert train is sys.modules["imgclf.train"]


NOTEBOOK = """
import imgclf
data = imgclf.download(["photos"], "data", progress=False)
run = imgclf.train("data", "runs/r1", overrides={"trainer.epochs": 2, "trainer.batch_size": 16,
                   "data.image_size": 32, "data.num_workers": 0, "model.arch": "resnet18"})
metrics = imgclf.evaluate(run, progress=False)
prediction = imgclf.predict(run, IMAGE)
print("RESULT", data.counts["ok"], run.epochs_run, round(metrics["accuracy"], 3), prediction.label)
"""


def test_a_notebook_runs_every_stage_and_sees_each_epoch(tmp_path: Path) -> None:
    """download -> train -> evaluate -> predict as a new user types it: no logging set up, no terminal."""
    classes = ["Sneaker", "Trouser", "Bag"]
    for split, n in (("train", 16), ("test", 6)):
        for label in classes:
            folder = tmp_path / "photos" / split / label
            folder.mkdir(parents=True)
            for image in demo_images(split, label, n):
                (folder / image.name).write_bytes(image.read_bytes())
    image = next((tmp_path / "photos" / "test" / "Bag").iterdir())
    script = tmp_path / "notebook.py"
    script.write_text(f"IMAGE = {str(image)!r}\n" + NOTEBOOK)
    env = {k: v for k, v in os.environ.items() if k != "IMGCLF_NO_BARS"}  # stderr is a pipe, as in Jupyter
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [line for line in proc.stderr.splitlines() if re.match(r"epoch \d/2: train loss [\d.]+, val loss", line)]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], proc.stderr[-3000:]
    result = proc.stdout.strip().splitlines()[-1].split()
    assert result[0] == "RESULT" and result[1] == str(3 * 22) and result[2] == "2"
    assert 0 <= float(result[3]) <= 1 and result[4] in classes

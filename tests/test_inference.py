"""inference: the batched input path equals presets.eval_transform, on real encoded images of every kind.

The torch path (torch backends) must be bitwise equal to eval_transform; the Pillow path (ONNX,
no torch) within 1 level in 255 before normalisation, and top-1 must not move on held-out
images with the shipped weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO_ROOT, demo_images, encode_image, real_images
from PIL import Image

from imgclf.images import Decoded, ImageLimits, decode_image
from imgclf.inference import load_classifier
from imgclf.inference._preprocess import PillowResize, Preprocessor, TorchResize, normalize_table
from imgclf.presets import Preprocessing, eval_resize, eval_transform, normalize

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "fashion_mnist_mobilenet_v3_small.pt"
PRESETS = [
    Preprocessing(64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the shipped weights'
    Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet-style
    Preprocessing(32, 37, (0.5, 0.5, 0.5), (0.25, 0.5, 0.75)),  # the tests' tiny runs
]
LIMITS = ImageLimits(min_side=1)


def _decoded() -> list[tuple[str, Image.Image]]:
    out = []
    for name, data in real_images().items():
        result = decode_image(data, LIMITS)
        assert isinstance(result, Decoded), name
        assert result.rotated == (name == "rotated.jpg") and result.image.mode == "RGB"
        out.append((name, result.image))
    return out


IMAGES = _decoded()


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.image_size}-{p.resize_size}")
def test_normalize_table_is_eval_transforms_float32_arithmetic(pre: Preprocessing) -> None:
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256).contiguous()
    expected = normalize(pre)(levels)[:, 0, :].numpy()
    assert np.array_equal(normalize_table(pre), expected)  # bitwise, not close


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.image_size}-{p.resize_size}")
def test_torch_path_is_bitwise_eval_transform(pre: Preprocessing) -> None:
    """One mixed batch (every kind, same-size images twice so the batched kernel runs) vs one image at a time."""
    images = [image for _, image in IMAGES] + [image.copy() for _, image in IMAGES[:4]]
    got = Preprocessor(pre, TorchResize(pre))(images)
    assert got.dtype == np.float32 and got.shape == (len(images), 3, pre.image_size, pre.image_size)
    transform = eval_transform(pre)
    names = [name for name, _ in IMAGES] + [name for name, _ in IMAGES[:4]]
    for name, image, row in zip(names, images, got, strict=True):
        assert np.array_equal(row, transform(image).numpy()), name


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.image_size}-{p.resize_size}")
def test_pillow_path_is_within_one_level_of_eval_transform(pre: Preprocessing) -> None:
    images = [image for _, image in IMAGES]
    resized = PillowResize(pre)(images)
    expected = torch.stack([eval_resize(pre)(image) for image in images]).permute(0, 2, 3, 1).numpy()
    diff = np.abs(resized.astype(int) - expected.astype(int))
    assert diff.max() <= 1, [name for (name, _), d in zip(IMAGES, diff, strict=True) if d.max() > 1]
    assert (diff > 0).mean() < 0.01  # a few values in a thousand at most
    # After normalisation: the same values differ by at most one level's step, 1 / (255 * std).
    floats = Preprocessor(pre, PillowResize(pre))(images)
    reference = torch.stack([eval_transform(pre)(image) for image in images]).numpy()
    assert np.abs(floats - reference).max() <= 1 / (255 * min(pre.std)) + 1e-6


def _grey_pngs(n: int = 12, seed: int = 5) -> list[bytes]:
    """Real grey PNGs (the demo's) at several sizes, so both upscaling and downscaling run."""
    rng = np.random.default_rng(seed)
    paths = sorted((DEMO_ROOT / "test").rglob("*.png"))
    out = []
    for i in rng.choice(len(paths), n, replace=False):
        image = Image.open(paths[i])
        side = int(rng.integers(8, 400))
        out.append(encode_image(image.resize((side, int(side * rng.uniform(0.5, 2.0)))), "PNG"))
    return out


@pytest.mark.parametrize("pre", PRESETS, ids=lambda p: f"{p.image_size}-{p.resize_size}")
@pytest.mark.parametrize("resizer", [PillowResize, TorchResize], ids=["pillow", "torch"])
def test_grey_images_kept_grey_give_bitwise_the_rgb_result(pre: Preprocessing, resizer: type) -> None:
    """predict and serve decode with keep_grey: one channel resized, repeated, same floats as RGB."""
    datas = _grey_pngs()
    grey = [decode_image(data, LIMITS, keep_grey=True).image for data in datas]  # type: ignore[union-attr]
    rgb = [decode_image(data, LIMITS).image for data in datas]  # type: ignore[union-attr]
    assert {image.mode for image in grey} == {"L"} and {image.mode for image in rgb} == {"RGB"}
    mixed = grey + rgb[:3]  # a batch may hold both kinds, same sizes included
    got = Preprocessor(pre, resizer(pre))(mixed)
    expected = Preprocessor(pre, resizer(pre))(rgb + rgb[:3])
    assert np.array_equal(got, expected)  # bitwise, not close


def test_keep_grey_leaves_every_other_mode_rgb() -> None:
    for name, data in real_images().items():
        decoded = decode_image(data, LIMITS, keep_grey=True)
        assert isinstance(decoded, Decoded), name
        assert decoded.image.mode == ("L" if decoded.source_mode == "L" else "RGB"), name


def _generated_photos(n: int, seed: int = 17) -> list[Image.Image]:
    """Held-out test images as JPEG photos would arrive: enlarged to 100-1200 px, any aspect, re-encoded."""
    rng = np.random.default_rng(seed)
    paths = sorted((DEMO_ROOT / "test").rglob("*.png"))
    photos = []
    for i in rng.choice(len(paths), n, replace=False):
        side = int(rng.integers(100, 1200))
        size = (side, int(side * rng.uniform(0.6, 1.6)))
        big = Image.open(paths[i]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        data = encode_image(big, "JPEG", quality=int(rng.integers(60, 96)))
        photos.append(decode_image(data, LIMITS).image)  # type: ignore[union-attr]
    return photos


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights")
def test_pillow_path_keeps_top1_of_the_shipped_model_on_held_out_images() -> None:
    """1,000 bundled test images and 300 JPEG photos: same top-1 through either input path."""
    classifier = load_classifier(SHIPPED)
    pre = classifier.preprocessing
    pillow = Preprocessor(pre, PillowResize(pre))
    sets = {"bundled test PNGs": [decode_image(p.read_bytes(), LIMITS).image  # type: ignore[union-attr]
                                  for p in sorted((DEMO_ROOT / "test").rglob("*.png"))],
            "JPEG photos": _generated_photos(300)}
    transform = eval_transform(pre)
    for name, images in sets.items():
        reference = np.stack([transform(image).numpy() for image in images])
        exact = np.concatenate([classifier.prepare_batch(images[i:i + 100]) for i in range(0, len(images), 100)])
        assert np.array_equal(exact, reference), name  # the torch backend's own path: bitwise
        approx = np.concatenate([pillow(images[i:i + 100]) for i in range(0, len(images), 100)])
        want = np.concatenate([classifier.probabilities(reference[i:i + 100]) for i in range(0, len(images), 100)])
        got = np.concatenate([classifier.probabilities(approx[i:i + 100]) for i in range(0, len(images), 100)])
        level = np.abs(approx - reference).max() * 255 * min(pre.std)
        print(f"\n{name}: {len(images)} images, max |input diff| {level:.2f} levels, "
              f"max |probability diff| {np.abs(got - want).max():.2e}")
        assert level <= 1.0001
        assert np.array_equal(got.argmax(1), want.argmax(1)), name


def _run_and_list_modules(script: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", script + HEAVY], capture_output=True, text=True, timeout=180)
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


HEAVY = ("\nimport json, sys\n"
         "heavy = sorted(m for m in ('torch', 'torchvision', 'onnx', 'pandas') if m in sys.modules)\n"
         "print(json.dumps(heavy), file=sys.stderr)\n")


def test_onnx_predict_of_one_image_never_imports_torch(tiny_run: Path, tmp_path: Path) -> None:
    """`imgclf predict --model model.onnx one.png` in a fresh process: the answer, and no torch in sys.modules."""
    from imgclf.stages import export

    onnx_file = export.run(export.ExportOptions(tiny_run, "onnx", tmp_path / "model.onnx")).path
    image = demo_images("test", "Coat", 1)[0]
    command = f"['predict', '--model', {str(onnx_file)!r}, {str(image)!r}, '--format', 'jsonl', '--no-progress']"
    heavy, stdout = _run_and_list_modules(f"from imgclf import cli\nassert cli.main({command}) == 0")
    assert not {"torch", "torchvision", "onnx"} & set(heavy), heavy
    row = json.loads(stdout.strip().splitlines()[-1])
    # The same answer as the checkpoint it came from (within the stated input tolerance and ONNX numerics).
    reference = load_classifier(tiny_run)
    probs = reference.probabilities(reference.prepare_batch([decode_image(image.read_bytes(), LIMITS).image]))
    assert row["status"] == "ok" and row["top"][0]["label"] == reference.class_names[int(probs[0].argmax())]
    # The stage itself (inputs, loader, inference, writers) needs neither torch nor pandas.
    heavy, _ = _run_and_list_modules(
        f"from imgclf.stages import predict\nprint(predict.run(predict.PredictOptions(inputs=[{str(image)!r}], "
        f"model={str(onnx_file)!r}, progress=False)))")
    assert heavy == [], heavy

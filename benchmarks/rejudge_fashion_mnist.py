"""Re-judge a shipped Fashion-MNIST checkpoint on all 10,000 official test images without imgclf.

    .venv/bin/python benchmarks/rejudge_fashion_mnist.py weights/fashion_mnist_resnet18_half.pt [--tta flip]

Nothing of imgclf is imported: the network is built here with timm from what the checkpoint records
(architecture, timm_kwargs, small_input: a 3x3 stride-1 first conv), its weights are loaded strictly
(a layer that does not match fails), the test images are read from the Debian package's idx file
(not from PNG files, not through imgclf's loader or preprocessing), scaled to [0, 1], repeated to 3
channels and normalised with the mean and std the checkpoint records; F1-macro and accuracy come
from scikit-learn. Only timm ResNets with small_input are rebuilt (what the shipped records are).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import timm
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

RAW = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Ankle_boot"]  # label i of the idx file


def test_set() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(RAW / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(RAW / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def build(checkpoint: dict) -> tuple[nn.Module, dict]:
    meta = checkpoint["imgclf"]
    model_cfg, data_cfg = meta["config"]["model"], meta["config"]["data"]
    arch = model_cfg["arch"]
    if not arch.startswith("timm/") or not model_cfg.get("small_input"):
        raise SystemExit(f"only timm ResNets with small_input are rebuilt here, not {arch}")
    net = timm.create_model(arch.removeprefix("timm/"), pretrained=False, num_classes=len(meta["class_names"]),
                            **(model_cfg.get("timm_kwargs") or {}))
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    net.load_state_dict(state, strict=True)
    return net.eval(), data_cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--tta", choices=("none", "flip"), default="none")
    args = parser.parse_args()
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=False)
    net, data_cfg = build(checkpoint)
    if data_cfg["image_size"] != 28 or data_cfg.get("crop_ratio", 1.0) != 1.0:
        raise SystemExit("this judge feeds the native 28 px: the checkpoint was trained at another size")
    names = checkpoint["imgclf"]["class_names"]
    images, labels = test_set()
    truth = np.array([names.index(OFFICIAL[i]) for i in labels])
    mean = torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = (x - mean) / std
    probs = []
    with torch.inference_mode():
        for batch in x.split(500):
            p = net(batch).softmax(1)
            if args.tta == "flip":
                p = (p + net(batch.flip(3)).softmax(1)) / 2
            probs.append(p)
    pred = torch.cat(probs).argmax(1).numpy()
    print(f"{args.weights}: {len(truth)} test images, tta {args.tta}: "
          f"F1-macro {f1_score(truth, pred, average='macro'):.4f}, accuracy {accuracy_score(truth, pred):.4f} "
          f"({int((pred == truth).sum())} right)")


if __name__ == "__main__":
    main()

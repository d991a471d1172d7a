"""Model factory: a name in, a classifier with the right head out.

torchvision architectures by name (see ARCHITECTURES), any timm model as
`timm/<name>` when timm is installed. Lower layer: imports nothing from the stages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from imgclf.errors import ConfigError, first_line

log = logging.getLogger(__name__)

ARCHITECTURES = (
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
)

# Measured once, not at run time (`imgclf models` prints it): architecture -> (parameters with a
# 10-class head, training images/s, inference images/s) on CPU at 64 px, channels_last, 2 torch
# threads, training batch 64 (AdamW step), inference batch 128. Machine: the project's 2-core
# x86_64 (AVX-512, no GPU). Command: .venv/bin/python benchmarks/models.py (best of 2 rounds)
# MEASURED_ON says when, and under what load (see docs/benchmarks.md#models-benchmarksmodelspy).
MEASURED_ON = "measured 2026-11-29 on the 2-core x86_64 machine, nothing else running"
MEASURED: dict[str, tuple[int, float, float]] = {
    "mobilenet_v3_small": (1528106, 552, 3917),
    "mobilenet_v3_large": (4214842, 243, 1444),
    "resnet18": (11181642, 147, 539),
    "resnet34": (21289802, 75, 298),
    "resnet50": (23528522, 59, 242),
    "efficientnet_b0": (4020358, 158, 970),
    "convnext_tiny": (27827818, 61, 255),
}


def _replace_head(model: nn.Module, arch: str, num_classes: int, dropout: float | None) -> nn.Module:
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:  # mobilenet, efficientnet, convnext: classifier is a Sequential ending in Linear
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
        if dropout is not None:
            for layer in model.classifier:
                if isinstance(layer, nn.Dropout):
                    layer.p = dropout
    return model


@contextlib.contextmanager
def _hub_dir(cache_dir: str | None) -> Iterator[Path]:
    """torch hub's folder for the duration of a load: CACHE_DIR/hub, as TORCH_HOME=CACHE_DIR would make it.

    The default (cache_dir None) is torch's own, TORCH_HOME/hub (~/.cache/torch/hub), so a
    cache_dir equal to the documented default finds the same files. set_dir is process-wide:
    the previous folder is put back afterwards.
    """
    before = torch.hub.get_dir()
    if cache_dir:
        torch.hub.set_dir(str(Path(cache_dir).expanduser() / "hub"))
    try:
        yield Path(torch.hub.get_dir())
    finally:
        torch.hub.set_dir(before)


def _small_input_stem(model: nn.Module, arch: str) -> None:
    """Make the stem downsample 2x less, for images of about 64 px and smaller.

    ImageNet stems shrink a 224 px image 2x (mobilenet, efficientnet), 4x (resnet: a stride-2
    7x7 conv, then max-pooling) or 4x (convnext's patchify) before the first block; on a 28 px
    image that leaves a few pixels for the later blocks. Here: stride 1 for the mobilenet and
    efficientnet stem conv (its pretrained weights still fit), a 3x3 stride-1 conv before resnet's
    max-pool (as CIFAR ResNets have), a 2x2 stride-2 patchify for convnext. Every later layer then
    sees a 2x larger map: the compute of a 2x larger image_size, without upscaling the input.
    """
    if arch.startswith("resnet"):
        _resnet_stride1_conv1(model)
    elif arch.startswith("convnext"):
        old = model.features[0][0]
        model.features[0][0] = nn.Conv2d(3, old.out_channels, 2, 2)
        nn.init.trunc_normal_(model.features[0][0].weight, std=0.02)  # torchvision's convnext init
        nn.init.zeros_(model.features[0][0].bias)
    else:  # mobilenet_v3_*, efficientnet_*: features[0][0] is the stride-2 3x3 stem conv
        model.features[0][0].stride = (1, 1)


def _resnet_stride1_conv1(model: nn.Module) -> None:
    """A ResNet's stride-2 7x7 `conv1` becomes a 3x3 stride-1 conv (torchvision's and timm's plain stems)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init


def _small_input_timm_stem(model: nn.Module, arch: str) -> None:
    """small_input for a timm ResNet with the plain stem (a single stride-2 7x7 `conv1`, then max-pooling).

    Its stem has the same layout as torchvision's, so it gets the same 3x3 stride-1 conv. Other timm
    models (deep stems, patchify stems, ...) differ too much to change safely: one clear error.
    """
    conv1 = getattr(model, "conv1", None)
    if not (isinstance(conv1, nn.Conv2d) and conv1.stride == (2, 2) and hasattr(model, "maxpool")):
        raise ConfigError(f"model.small_input: only for the torchvision architectures ({', '.join(ARCHITECTURES)}) "
                          f"and timm ResNets with the plain 7x7 stem, not {arch}")
    _resnet_stride1_conv1(model)


def _pretrained_torchvision(arch: str, cache_dir: str | None) -> nn.Module:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    with _hub_dir(cache_dir) as hub:
        # torch.hub checks a file's hash prefix only when it downloads it: a file already in
        # HUB/checkpoints/ under the URL's name is loaded as it is (weights_only, no network).
        try:
            return torchvision.models.get_model(arch, weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise ConfigError(
                f"model.pretrained: cannot fetch ImageNet weights for {arch} ({err.__class__.__name__}); "
                f"offline, download {weights.url} elsewhere and set model.weights=PATH "
                f"(or put it in {hub / 'checkpoints'})"
            ) from None


# timm.create_model arguments that open files, fetch weights or change what the model is (a feature
# extractor): imgclf loads weights itself (model.pretrained, model.weights), so these are refused.
TIMM_LOADER_KEYS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
    "pretrained_model_args", "checkpoint_path", "cache_dir", "pruned", "model_cfg", "feature_cfg",
    "features_only", "feature_cls", "out_indices", "kwargs_filter", "num_classes", "model_name",
})


def _timm_model(name: str, num_classes: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    refused = sorted(TIMM_LOADER_KEYS & set(kwargs))
    if refused:
        raise ConfigError(f"model.timm_kwargs.{refused[0]}: controls how timm loads weights; refused "
                          "(use model.pretrained or model.weights)")
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.arch: {name!r} needs timm (pip install 'imgclf[timm]')") from None
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument this model does not take
        raise ConfigError(f"model.timm_kwargs: timm cannot build {name!r} with {kwargs}: "
                          f"{first_line(err, with_type=False)}") from None
    except OSError as err:  # huggingface_hub's "not in cache and no network" errors are OSErrors
        raise ConfigError(
            f"model.pretrained: cannot fetch timm weights for {name!r} ({err.__class__.__name__}); offline, "
            "download them elsewhere and set model.weights=PATH (or pre-fill HF_HOME's cache)") from None
    except RuntimeError as err:
        raise ConfigError(f"model.arch: timm cannot build {name!r}: {first_line(err, with_type=False)}") from None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"model.weights: {path} is not a loadable state dict ({err.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights: {path} does not hold a state dict")
    return {k.removeprefix("model."): v for k, v in state.items()}


def _head_keys(model: nn.Module) -> set[str]:
    """state_dict names of the classification head's tensors (`fc.weight`, `classifier.3.bias`, ...)."""
    head = {id(p) for p in head_parameters(model)}
    return {name for name, param in model.named_parameters() if id(param) in head}


def _load_backbone_weights(model: nn.Module, path: str, may_differ: set[str]) -> None:
    """Load every tensor of a local state dict, or refuse: never a silent partial load.

    By name when the file has every tensor of the model (tensors in `may_differ`, the head and a
    replaced stem, are skipped when their shape differs: another class count). Otherwise, as
    EfficientNet-PyTorch's `_conv_stem.weight` for timm's `conv_stem.weight`, by order: only when the
    file has exactly as many tensors and every pair has the same shape (bar those in `may_differ`).
    One log line says which it was, how many tensors loaded and what was skipped.
    """
    state = load_state_file(path)
    own = model.state_dict()
    by_name = all(k in state for k in own if k not in may_differ)
    if by_name:
        pairs = [(k, k) for k in own if k in state]
    else:
        pairs = _pairs_by_order(path, list(state), list(own), state, own, may_differ)
    bad = [(src, dst) for src, dst in pairs if state[src].shape != own[dst].shape and dst not in may_differ]
    if bad:
        src, dst = bad[0]
        raise ConfigError(f"model.weights: {path}: {len(bad)} tensor(s) differ in shape from the architecture's, "
                          f"e.g. {src!r} {tuple(state[src].shape)} vs {dst!r} {tuple(own[dst].shape)}; "
                          "refusing a partial load (wrong model.arch?)")
    usable = {dst: state[src] for src, dst in pairs if state[src].shape == own[dst].shape}
    skipped = sorted(k for k in own if k not in usable)
    model.load_state_dict(usable, strict=False)
    how = ("by name" if by_name else
           f"by order: names differ (file {pairs[0][0]!r} -> model {pairs[0][1]!r}), every other tensor matches "
           "in shape")
    log.info("weights: %s: %d of %d tensors loaded %s; %s", path, len(usable), len(own), how,
             f"new (random): {', '.join(skipped)}" if skipped else "nothing new")


def _pairs_by_order(path: str, names: list[str], own_names: list[str], state: dict[str, torch.Tensor],
                    own: dict[str, torch.Tensor], may_differ: set[str]) -> list[tuple[str, str]]:
    found = sum(k in state for k in own)
    if len(names) != len(own_names):
        raise ConfigError(f"model.weights: {path}: {found} of the architecture's {len(own)} tensor names are in the "
                          f"file, and mapping by order needs as many tensors ({len(names)} in the file); "
                          "refusing (wrong model.arch?)")
    pairs = list(zip(names, own_names, strict=True))
    mismatched = [(s, d) for s, d in pairs if state[s].shape != own[d].shape and d not in may_differ]
    if mismatched:
        src, dst = mismatched[0]
        raise ConfigError(f"model.weights: {path}: tensor names differ from the architecture's and mapping by order "
                          f"fails on {len(mismatched)} tensor(s), first {src!r} {tuple(state[src].shape)} -> "
                          f"{dst!r} {tuple(own[dst].shape)}; refusing (wrong model.arch?)")
    return pairs


def create_model(
    arch: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    cache_dir: str | None = None,
    dropout: float | None = None,
    small_input: bool = False,
    timm_kwargs: dict[str, Any] | None = None,
    announce: bool = True,
) -> nn.Module:
    """A classifier for `num_classes`; small_input and timm_kwargs shape the layers (checkpoints record both).

    `announce=False` (a checkpoint's own weights are loaded next) keeps the "starts from random
    initialisation" line out of evaluate's and predict's logs, where it would be untrue."""
    if num_classes < 2:
        raise ConfigError(f"model: need at least 2 classes, got {num_classes}")
    if timm_kwargs and not arch.startswith("timm/"):
        raise ConfigError(f"model.timm_kwargs: only for timm/<name> architectures, not {arch}")
    if arch.startswith("timm/"):
        model = _timm_model(arch.removeprefix("timm/"), num_classes, pretrained and weights is None, timm_kwargs or {})
        if small_input:
            _small_input_timm_stem(model, arch)
    elif arch in ARCHITECTURES:
        model = (_pretrained_torchvision(arch, cache_dir) if pretrained and weights is None
                 else torchvision.models.get_model(arch, weights=None))
        model = _replace_head(model, arch, num_classes, dropout)
        if small_input:
            _small_input_stem(model, arch)
    else:
        raise ConfigError(f"model.arch: unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)}, "
                          "or timm/<name>)")
    if weights:
        _load_backbone_weights(model, weights, _head_keys(model) | _replaced_stem(model, arch, small_input))
    elif pretrained:
        log.info("weights: %s; head new (random) for %d classes", _hub_name(model, arch), num_classes)
    elif announce:
        log.info("weights: none: %s starts from random initialisation (model.pretrained=false, no model.weights)",
                 arch)
    return model


def _replaced_stem(model: nn.Module, arch: str, small_input: bool) -> set[str]:
    """Tensors small_input made anew (resnet's 3x3 conv1, convnext's patchify): they differ from any file's."""
    if not small_input:
        return set()
    prefix = "features.0.0." if arch.startswith("convnext") else "conv1." if "resnet" in arch else None
    return {k for k in model.state_dict() if prefix and k.startswith(prefix)}


def _hub_name(model: nn.Module, arch: str) -> str:
    if arch.startswith("timm/"):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return f"timm hub {cfg.get('hf_hub_id') or arch.removeprefix('timm/')}"
    return f"torchvision {torchvision.models.get_model_weights(arch).DEFAULT} (ImageNet)"


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's momentum; returns how many layers were changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
            count += 1
    return count


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classification head (for freezing the backbone)."""
    for attr in ("fc", "classifier", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return list(head.parameters())
    return []


def fast_layout(batch: torch.Tensor) -> torch.Tensor:
    """The batch in the memory layout convolutions run fastest in on its device.

    channels_last (NHWC) on CUDA and CPU: oneDNN's NHWC depthwise kernels train mobilenet and
    efficientnet 1.5-1.8x faster on CPU, dense convnets about equally (benchmarks/cpu_layout.py).
    The weights follow the input's layout, so only the batch is converted.
    """
    if batch.dim() == 4 and batch.device.type in ("cuda", "cpu"):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch

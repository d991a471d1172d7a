"""Model factory: a name in, a classifier with the right head out.

torchvision architectures by name (see ARCHITECTURES), any timm model as
`timm/<name>` when timm is installed. Lower layer: imports nothing from the stages.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from imgclf.errors import ConfigError

ARCHITECTURES = (
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
)


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


def _pretrained_torchvision(arch: str, cache_dir: str | None) -> nn.Module:
    if cache_dir:
        torch.hub.set_dir(cache_dir)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ConfigError(
            f"model.pretrained: cannot fetch ImageNet weights for {arch} ({err.__class__.__name__}); "
            f"offline, download {weights.url} elsewhere and set model.weights=PATH "
            f"(or put it in {Path(torch.hub.get_dir()) / 'checkpoints'})"
        ) from None


def _timm_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.arch: {name!r} needs timm (pip install 'imgclf[timm]')") from None
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except OSError as err:  # huggingface_hub's "not in cache and no network" errors are OSErrors
        raise ConfigError(
            f"model.pretrained: cannot fetch timm weights for {name!r} ({err.__class__.__name__}); offline, "
            "download them elsewhere and set model.weights=PATH (or pre-fill HF_HOME's cache)") from None
    except RuntimeError as err:
        raise ConfigError(f"model.arch: timm cannot build {name!r}: {str(err).splitlines()[0]}") from None


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


def _load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict, skipping head tensors whose shape differs (other class count)."""
    state = load_state_file(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"model.weights: no tensor in {path} matches this architecture")
    model.load_state_dict(usable, strict=False)


def create_model(
    arch: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    cache_dir: str | None = None,
    dropout: float | None = None,
) -> nn.Module:
    if num_classes < 2:
        raise ConfigError(f"model: need at least 2 classes, got {num_classes}")
    if arch.startswith("timm/"):
        model = _timm_model(arch.removeprefix("timm/"), num_classes, pretrained and weights is None)
    elif arch in ARCHITECTURES:
        model = (_pretrained_torchvision(arch, cache_dir) if pretrained and weights is None
                 else torchvision.models.get_model(arch, weights=None))
        model = _replace_head(model, arch, num_classes, dropout)
    else:
        raise ConfigError(f"model.arch: unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)}, "
                          "or timm/<name>)")
    if weights:
        _load_backbone_weights(model, weights)
    return model


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

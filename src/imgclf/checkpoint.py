"""Checkpoint contract: everything needed to rebuild the model, as plain data.

A checkpoint is a dict loadable with `torch.load(path, weights_only=True)`:

    state_dict   model tensors, keys prefixed "model." (Lightning's layout)
    imgclf       {"format": 2, "class_names": [str], "config": {...}}   # config is TrainConfig.to_plain()

Each fact is held once: the architecture is config.model.arch and the eval preprocessing is
derived from config.data by `Preprocessing.from_config` (`describe` gives both). Format 1
checkpoints (the weights shipped before 0.2) also held `arch` and `preprocessing`; they still load.

Lightning checkpoints written by `train` (RUN_DIR/checkpoints/{best,last}.ckpt) carry the
extra keys Lightning needs to resume (optimizer states, loops, callbacks); the slim files
under weights/ carry only the two keys above. `load_model` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf._files import atomic_path
from imgclf.config import TrainConfig
from imgclf.errors import DataError, first_line
from imgclf.models import create_model
from imgclf.presets import Preprocessing
from imgclf.rundir import RunDir

FORMAT_VERSION = 2
READS = (1, 2)


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on CPU
    class_names: list[str]
    preprocessing: Preprocessing
    config: TrainConfig
    path: Path


def make_meta(config: TrainConfig, class_names: list[str], pre: Preprocessing | None = None) -> dict[str, Any]:
    if pre is not None and pre != Preprocessing.from_config(config.data):
        raise ValueError(f"preprocessing {pre} is not the one config.data defines")  # a bug, not a user error
    return {"format": FORMAT_VERSION, "class_names": list(class_names), "config": config.to_plain()}


@dataclass(frozen=True)
class Description:
    """What a checkpoint's metadata says, whatever its format."""

    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    config: TrainConfig


def describe(meta: Any, where: str | Path = "checkpoint") -> Description:
    """Validate `ckpt["imgclf"]` and derive what it implies; DataError (one line) when it is unusable."""
    if not isinstance(meta, dict):
        raise DataError(f"{where}: 'imgclf' metadata is not a mapping")
    version = meta.get("format")
    if version not in READS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise DataError(f"{where}: checkpoint format {version!r}, this imgclf reads formats "
                        f"{', '.join(map(str, READS))}" + ("; upgrade imgclf to load it" if newer else ""))
    needed = ("class_names", "config") + (("arch", "preprocessing") if version == 1 else ())
    missing = [k for k in needed if k not in meta]
    if missing:
        raise DataError(f"{where}: imgclf metadata lacks {', '.join(missing)}")
    try:
        config = TrainConfig.model_validate(meta["config"])
        class_names = [str(name) for name in meta["class_names"]]
        if version == 1:
            return Description(str(meta["arch"]), class_names, Preprocessing.from_plain(meta["preprocessing"]), config)
        return Description(config.model.arch, class_names, Preprocessing.from_config(config.data), config)
    except Exception as err:  # pydantic ValidationError, KeyError/TypeError/ValueError from bad metadata
        raise DataError(f"{where}: imgclf metadata is invalid ({first_line(err)})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (else last); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for candidate in (RunDir(path).best, RunDir(path).last):
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no checkpoints/best.ckpt or last.ckpt in this run directory")
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint or run directory")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    return _read_resolved(resolve_checkpoint(path))


def _read_resolved(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: not a loadable checkpoint ({err.__class__.__name__}: {str(err)[:100]})") from None
    if not isinstance(ckpt, dict) or "imgclf" not in ckpt or "state_dict" not in ckpt:
        raise DataError(f"{path}: not an imgclf checkpoint (no 'imgclf' metadata)")
    return ckpt


def load_model(path: str | Path) -> LoadedModel:
    """Rebuild the model from a run directory or checkpoint; DataError (exit 2) for anything unusable."""
    resolved = resolve_checkpoint(path)
    ckpt = _read_resolved(resolved)
    desc = describe(ckpt["imgclf"], resolved)
    try:
        # Structural options (a small-input stem) shape the layers the state dict fills.
        model = create_model(desc.arch, len(desc.class_names), small_input=desc.config.model.small_input,
                             timm_kwargs=desc.config.model.timm_kwargs)
    except Exception as err:  # ConfigError for an unknown arch, anything timm raises
        raise DataError(f"{resolved}: imgclf metadata is invalid ({first_line(err)})") from None
    try:
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
    except Exception as err:  # shapes or keys that do not fit the arch with len(class_names) outputs
        raise DataError(f"{resolved}: weights do not match {desc.arch} with {len(desc.class_names)} classes "
                        f"({first_line(err)})") from None
    model.eval()
    return LoadedModel(model, desc.class_names, desc.preprocessing, desc.config, resolved)


def save_slim(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a weights-only file (no optimizer state): what ships under weights/."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state_dict, "imgclf": meta}, tmp)
    return path

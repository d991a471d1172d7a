"""Checkpoint contract: everything needed to rebuild the model, as plain data.

A checkpoint is a dict loadable with `torch.load(path, weights_only=True)`:

    state_dict   model tensors, keys prefixed "model." (Lightning's layout)
    imgclf       {"format": 2, "class_names": [str], "config": {...}}   # config is TrainConfig.to_plain()
                 task: multilabel adds "task": "multilabel" and "thresholds": [float] (one per class,
                 chosen on the validation split after training); absent task = single-label

Each fact is held once: the architecture is config.model.arch and the eval preprocessing is
derived from config.data by `Preprocessing.from_config` (`describe` gives both). Format 1
checkpoints (the weights shipped before 0.2) also held `arch` and `preprocessing`; they still load.

Lightning checkpoints written by `train` (RUN_DIR/checkpoints/{best,last}.ckpt) carry the
extra keys Lightning needs to resume (optimizer states, loops, callbacks); the slim files
under weights/ carry only the two keys above. `load_model` reads both.

A checkpoint may come from anyone, so its metadata is not trusted to size anything before the
stored tensors agree with it (issue 22, class 9): `load_model` first builds the architecture on
PyTorch's meta device (shapes, no storage), with a budget on how many modules, parameters and
buffers that build may register (a multiple of the tensors the file stores), and compares every
shape with the stored tensors. 300,000 class names against a 3-row head, or `embed_dim: 12288`
against a 192-wide ViT, are refused there, in milliseconds and without allocating the model.
timm arguments that load files or fetch weights (`checkpoint_path`, `pretrained_cfg`, ...) and
values that are not plain scalars are refused by `describe`, before anything is built. Before
any of that, the pickled part (data.pkl) may hold at most MAX_PICKLE_BYTES: 3,000,000 class
names are refused without being unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgclf import multilabel
from imgclf._files import atomic_path
from imgclf.config import TrainConfig
from imgclf.errors import DataError, first_line
from imgclf.models import TIMM_LOADER_KEYS, create_model
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
    meta: dict[str, Any] = field(default_factory=dict)  # ckpt["imgclf"] as stored, fields unknown here included
    task: str = multilabel.SINGLE_LABEL  # or multilabel.TASK: sigmoid outputs, labels above `thresholds`
    thresholds: list[float] | None = None  # task: multilabel: one per class


def make_meta(config: TrainConfig, class_names: list[str], pre: Preprocessing | None = None,
              thresholds: list[float] | None = None) -> dict[str, Any]:
    if pre is not None and pre != Preprocessing.from_config(config.data):
        raise ValueError(f"preprocessing {pre} is not the one config.data defines")  # a bug, not a user error
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "class_names": list(class_names), "config": config.to_plain()}
    if config.task == multilabel.TASK:  # single-label metadata stays exactly as before
        meta["task"] = multilabel.TASK
        meta["thresholds"] = [float(t) for t in thresholds] if thresholds is not None else \
            [multilabel.DEFAULT_THRESHOLD] * len(class_names)
    return meta


@dataclass(frozen=True)
class Description:
    """What a checkpoint's metadata says, whatever its format."""

    arch: str
    class_names: list[str]
    preprocessing: Preprocessing
    config: TrainConfig
    task: str = multilabel.SINGLE_LABEL
    thresholds: list[float] | None = None


def _task_of(meta: dict[str, Any], n_classes: int, where: str | Path) -> tuple[str, list[float] | None]:
    """The metadata's task and thresholds, checked: one threshold per class, each in [0, 1]."""
    task = meta.get("task", multilabel.SINGLE_LABEL)
    if task == multilabel.SINGLE_LABEL:
        return task, None
    if task != multilabel.TASK:
        raise DataError(f"{where}: imgclf metadata: task {str(task)[:40]!r} is not single_label or multilabel")
    thresholds = meta.get("thresholds")
    if (not isinstance(thresholds, list) or len(thresholds) != n_classes
            or not all(isinstance(t, int | float) and 0.0 <= t <= 1.0 for t in thresholds)):
        raise DataError(f"{where}: imgclf metadata: task multilabel needs 'thresholds', one number in [0, 1] "
                        f"per class ({n_classes})")
    return task, [float(t) for t in thresholds]


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
        _check_timm_kwargs(_timm_kwargs_of(meta["config"]), where)
        config = TrainConfig.model_validate(meta["config"])
        class_names = [str(name) for name in meta["class_names"]]
        if version == 1:
            return Description(str(meta["arch"]), class_names, Preprocessing.from_plain(meta["preprocessing"]), config)
        task, thresholds = _task_of(meta, len(class_names), where)
        return Description(config.model.arch, class_names, Preprocessing.from_config(config.data), config,
                           task, thresholds)
    except DataError:
        raise
    except Exception as err:  # pydantic ValidationError, KeyError/TypeError/ValueError from bad metadata
        raise DataError(f"{where}: imgclf metadata is invalid ({first_line(err)})") from None


_PLAIN = (type(None), bool, int, float, str)


def _timm_kwargs_of(config: Any) -> Any:
    model = config.get("model") if isinstance(config, dict) else None
    return model.get("timm_kwargs") if isinstance(model, dict) else None


def _check_timm_kwargs(kwargs: Any, where: str | Path) -> None:
    """Refuse timm arguments that make the loader open a path or fetch weights, and any value that
    is not a plain scalar (or a short list of them): a checkpoint describes layers, nothing more."""
    if not isinstance(kwargs, dict):
        return  # pydantic reports the wrong type
    for key, value in kwargs.items():
        if key in TIMM_LOADER_KEYS:
            raise DataError(f"{where}: imgclf metadata sets model.timm_kwargs.{key}, which controls how "
                            "weights are loaded; a checkpoint holds its own weights, so this key is refused")
        items = value if isinstance(value, list | tuple) and len(value) <= 16 else [value]
        if not all(isinstance(v, _PLAIN) and (not isinstance(v, str) or len(v) <= 200) for v in items):
            raise DataError(f"{where}: imgclf metadata: model.timm_kwargs.{str(key)[:60]} is not a plain "
                            "value (a number, a short string or a short list of them)")


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


# The pickled part of a checkpoint (keys, class names, config; the tensors are separate zip members):
# 15-40 KB in the files train writes. Unpickling is pure Python under weights_only (~15 us and ~150
# bytes per object), so a 90 MB list of 3M class names would cost a minute and 0.5 GB to reject.
MAX_PICKLE_BYTES = 16 * 2**20


def _check_pickle_size(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = [i.file_size for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    except (zipfile.BadZipFile, OSError):
        return  # torch's legacy format, or not a checkpoint: torch.load says so
    if sizes and max(sizes) > MAX_PICKLE_BYTES:
        raise DataError(f"{path}: its metadata (data.pkl) is {max(sizes) / 2**20:.0f} MiB, over the "
                        f"{MAX_PICKLE_BYTES // 2**20} MiB a checkpoint's keys, class names and config need; "
                        "refused before reading it")


def _read_resolved(path: Path) -> dict[str, Any]:
    _check_pickle_size(path)
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
    if not isinstance(ckpt["state_dict"], dict):
        raise DataError(f"{resolved}: 'state_dict' is not a mapping of tensors")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if isinstance(k, str) and k.startswith("model.")}
    check_shapes(desc, state, resolved)  # before anything the metadata sizes is allocated
    model = _build(desc, resolved)
    try:
        model.load_state_dict(state)
    except Exception as err:  # shapes or keys that do not fit the arch with len(class_names) outputs
        raise DataError(f"{resolved}: weights do not match {desc.arch} with {len(desc.class_names)} classes "
                        f"({first_line(err)})") from None
    model.eval()
    return LoadedModel(model, desc.class_names, desc.preprocessing, desc.config, resolved, dict(ckpt["imgclf"]),
                       desc.task, desc.thresholds)


def _build(desc: Description, where: Path) -> nn.Module:
    try:
        # Structural options (a small-input stem) shape the layers the state dict fills.
        return create_model(desc.arch, len(desc.class_names), small_input=desc.config.model.small_input,
                            timm_kwargs=desc.config.model.timm_kwargs, announce=False)
    except Exception as err:  # ConfigError for an unknown arch, anything timm raises
        raise DataError(f"{where}: imgclf metadata is invalid ({first_line(err)})") from None


class _OverBudget(Exception):
    pass


@dataclass
class _Budget:
    limit: int
    count: int = 0

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit


@contextmanager
def _registration_budget(limit: int) -> Iterator[_Budget]:
    """Raise _OverBudget once more than `limit` modules, parameters and buffers have been registered
    (process-wide hooks, removed on exit): a model built from metadata cannot outgrow the file.
    Whoever catches the exception on the way (create_model rewraps timm's errors) cannot hide it:
    the caller reads `exceeded`."""
    from torch.nn.modules import module as torch_module

    budget = _Budget(limit)

    def hook(*_: Any) -> None:
        budget.count += 1
        if budget.exceeded:
            raise _OverBudget

    handles = [torch_module.register_module_module_registration_hook(hook),
               torch_module.register_module_parameter_registration_hook(hook),
               torch_module.register_module_buffer_registration_hook(hook)]
    try:
        yield budget
    finally:
        for handle in handles:
            handle.remove()


def check_shapes(desc: Description, state: dict[str, Any], where: str | Path) -> None:
    """DataError unless the model `desc` describes has exactly the stored tensors' names and shapes.

    The model is built on the meta device (no storage), under a registration budget of a few
    times the number of stored tensors, so neither the class count nor timm_kwargs can make
    this check itself expensive."""
    limit = 8 * len(state) + 1024  # registrations per stored tensor: ~2-4 (activations, dropouts, norms)
    too_big = DataError(f"{where}: imgclf metadata describes a model far larger than the {len(state)} "
                        f"tensors the file stores ({desc.arch}); refused before building it")
    with _registration_budget(limit) as budget:
        try:
            with torch.device("meta"):
                skeleton = _build(desc, Path(where))
        except (_OverBudget, DataError):
            if not budget.exceeded:
                raise
            raise too_big from None
    if budget.exceeded:  # a library that swallowed _OverBudget and went on
        raise too_big
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    problems = [f"missing {k}" for k in wanted if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in wanted]
    problems += [f"{k} is {stored[k]}, expected {wanted[k]}" for k in wanted
                 if k in stored and stored[k] != wanted[k]]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{where}: weights do not match {desc.arch} with {len(desc.class_names)} classes "
                        f"({problems[0][:200]}{more})")


def save_slim(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a weights-only file (no optimizer state): what ships under weights/."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state_dict, "imgclf": meta}, tmp)
    return path

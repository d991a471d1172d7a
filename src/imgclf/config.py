"""Typed training configuration: YAML file + dotted `key=value` overrides, validated by pydantic.

Every stage receives a `TrainConfig` object, never a raw dict. An unknown key or a bad
value raises `ConfigError` with one line that names the key, and the CLI exits with 2.
`configs/default.yaml` documents every key; `TrainConfig()` holds the same defaults.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from imgclf import _yaml
from imgclf.errors import ConfigError

# Every key with its default and a comment; tests/test_config.py checks it equals TrainConfig().
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


class _Section(BaseModel):
    # extra="forbid" is what turns a typo in the YAML into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    arch: str = "mobilenet_v3_small"
    pretrained: bool = False
    weights: str | None = None
    cache_dir: str | None = None
    freeze_backbone_epochs: int = Field(0, ge=0)
    # "probe": the new head starts as a logistic regression fitted on the pretrained backbone's features
    # of the (un-augmented) training images, a linear probe, so fine-tuning starts from a trained head.
    head_init: Literal["random", "probe"] = "random"
    # "better": once trained, the fine-tuned model and the linear probe (pretrained backbone + logistic
    # regression head) predict the validation images; best.ckpt is the fine-tuned one only when it is
    # clearly better there (train/_probe.py). Pretrained backbones only.
    keep: Literal["finetuned", "better"] = "finetuned"
    # BatchNorm layers keep their running statistics (eval mode) while training: pretrained backbones.
    bn_frozen: bool = False
    # "auto" sizes BatchNorm momentum to the number of steps per epoch (see models.py).
    bn_momentum: float | Literal["auto", "library"] = "auto"
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    # Stem downsamples 2x less (models._small_input_stem): for images of about 64 px and smaller.
    small_input: bool = False
    # Keyword arguments for timm.create_model (timm/<name> only), e.g. {"drop_path_rate": 0.1}.
    timm_kwargs: dict[str, Any] = {}
    # The first conv's initial weights (train/_tricks.py): "identity" passes the image through its first
    # filters, "whiten" sets them to a PCA whitening of training patches. Dense 3-channel first convs only.
    stem_init: Literal["default", "identity", "whiten"] = "default"

    @field_validator("stem_init")
    @classmethod
    def _stem_init_from_scratch(cls, v: str, info: ValidationInfo) -> str:
        # pretrained and weights are declared above, so they are validated (in info.data) by now.
        if v != "default" and (info.data.get("pretrained") or info.data.get("weights")):
            raise ValueError(f"{v} would overwrite the pretrained first layer: use it with pretrained=false "
                             "and no weights")
        return v

    @field_validator("bn_momentum")
    @classmethod
    def _momentum_range(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1], 'auto' or 'library'")
        return v


class AugmentConfig(_Section):
    # "alternate": each image mirrored in every other epoch (airbench), not by a coin flip each time.
    hflip: bool | Literal["alternate"] = True
    crop_scale: tuple[float, float] = (0.35, 1.0)
    policy: Literal["none", "randaugment", "trivialaugment"] = "none"
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    # Batch mixing (torchvision.transforms.v2 MixUp / CutMix): the Beta(alpha, alpha) parameter, 0 = off.
    # With both on, each mixed batch gets one of the two at random.
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)  # share of training batches that are mixed
    # Progressive resizing: training batches scaled to this side at the start, growing linearly to
    # image_size by `progressive_until` of training (validation always at image_size). null = off.
    progressive_min_size: int | None = Field(None, ge=8)
    progressive_until: float = Field(0.75, ge=0.0, le=1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        # Checked here, not when the first batch is augmented (a traceback mid-epoch).
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("must be [low, high] with 0 < low <= high <= 1")
        return v


class DataConfig(_Section):
    image_size: int = Field(64, ge=16, le=1024)
    # Eval resizes to image_size / crop_ratio, then centre-crops image_size.
    crop_ratio: float = Field(0.875, gt=0.0, le=1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Resampling of every resize: eval, training's decoder, augmentation, predict, serve, export.
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    num_workers: int = Field(2, ge=0)
    # Decoded, resized images kept in RAM after the first epoch: "auto" when they fit cache_max_gb.
    cache: bool | Literal["auto"] = "auto"
    cache_max_gb: float = Field(4.0, ge=0.0)
    # Tar shards on object storage (s3://...) fetched whole into this local folder and read there:
    # one GET per shard instead of one per image. Never evicted: needs disk for the shards read.
    shard_cache: str | None = None
    balanced_sampler: bool = False
    # task: multilabel: the separator between the labels of one manifest label cell ("dress|red").
    label_sep: str = Field("|", min_length=1, max_length=8)
    # Share of stored images that may be unreadable (skipped with a warning) before a run stops.
    max_unreadable: float = Field(0.05, ge=0.0, le=1.0)
    # Rows left out of training: an `imgclf audit` audit.csv (its drop/relabel rows), a review's
    # decisions.csv (drop rows left out, relabel rows trained with their new label) or any CSV with a
    # `row` column. Read when the split is made (data.make_split); checked against the manifest there.
    exclude: str | None = None
    augment: AugmentConfig = AugmentConfig()

    @field_validator("exclude")
    @classmethod
    def _exclude_csv(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or not v.lower().endswith(".csv")):
            raise ValueError("must be the path of a CSV file (an audit's audit.csv) or null")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0.0:
            raise ValueError("every channel's std must be > 0 (images are divided by it)")
        return v


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    # "find": run the learning-rate finder first (train/_lr_find.py) and train with its suggestion.
    lr: float | Literal["find"] = 2e-3
    # Learning rate of the backbone (every layer but the head) relative to lr: < 1 for fine-tuning.
    backbone_lr_mult: float = Field(1.0, gt=0.0, le=10.0)
    lr_find_steps: int = Field(100, ge=10, le=10_000)  # batches the finder tries (one LR each)
    weight_decay: float = Field(0.05, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    nesterov: bool = True  # sgd: Nesterov momentum (ignored at momentum 0)
    # Lookahead around the optimizer (timm's): every k steps the weights move halfway back. 0 = off.
    lookahead_steps: int = Field(0, ge=0, le=1000)

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 100.0:
            raise ValueError("must be a number in (0, 100) or 'find'")
        return v


class LossConfig(_Section):
    # cross_entropy: single-label. bce (sigmoid + binary cross-entropy) and asl (asymmetric loss,
    # Ridnik et al. 2021): task: multilabel, which takes bce when name is left at its default.
    name: Literal["cross_entropy", "bce", "asl"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = "none"
    # bce: "auto" weighs each label's positives by negatives / positives in the train subset (rare tags).
    pos_weight: Literal["none", "auto"] = "none"
    # asl: negatives' focusing exponent, positives' exponent, and the probability margin below which
    # an easy negative counts for nothing (the paper's defaults).
    gamma_neg: float = Field(4.0, ge=0.0, le=20.0)
    gamma_pos: float = Field(1.0, ge=0.0, le=20.0)
    clip: float = Field(0.05, ge=0.0, lt=1.0)


class TrainerConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    # task: multilabel: val_map (mAP, its default), val_f1_macro (macro F1 at 0.5), val_accuracy (subset
    # accuracy) or val_loss.
    monitor: Literal["val_f1_macro", "val_accuracy", "val_loss", "val_map"] = "val_f1_macro"
    early_stopping_patience: int | None = Field(None, ge=1)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    # "auto": bf16 autocast on CUDA that supports it, else fp16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    max_time_minutes: float | None = Field(None, gt=0.0)
    tensorboard: bool = False  # kept for old configs: the same as logger: tensorboard
    # Experiment trackers (Lightning loggers) besides metrics.csv: none, tensorboard, mlflow, or a list.
    logger: Literal["none", "tensorboard", "mlflow"] | list[Literal["tensorboard", "mlflow"]] = "none"
    mlflow_tracking_uri: str | None = None  # default: RUN_DIR/mlruns, a local file store (no server)
    mlflow_experiment: str = "imgclf"
    progress_bar: bool = True
    # CPU only. "auto": cores minus DataLoader workers (at least 1); oversubscribed OpenMP threads
    # spin-wait on each other and can train 10x slower than one thread.
    cpu_threads: int | Literal["auto"] = "auto"

    @field_validator("cpu_threads")
    @classmethod
    def _threads_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


# What task: multilabel cannot combine with, and why (one line each, naming the key).
_SINGLE_LABEL_ONLY = {
    "loss.class_weights": ("balanced", "weighs classes of a softmax; use loss.pos_weight: auto"),
    "loss.label_smoothing": (None, "smooths one-hot targets; not used with sigmoid outputs"),
    "model.head_init": ("probe", "fits a softmax logistic regression as the head"),
    "data.balanced_sampler": (True, "samples by one label per image"),
    "data.augment.mixup": (None, "mixes one class index per image"),
    "data.augment.cutmix": (None, "mixes one class index per image"),
}

# Set by the single-label photo preset: its multi-label twin is the answer to these two.
_PHOTO_PRESET_KEYS = ("loss.label_smoothing", "model.head_init")


class TrainConfig(_Section):
    seed: int = 42
    # single_label: one class per image (softmax). multilabel: a set of labels per image (sigmoid),
    # the manifest's label cell split at data.label_sep; see docs/multilabel.md.
    task: Literal["single_label", "multilabel"] = "single_label"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _task_fits_loss(self) -> TrainConfig:
        if self.task == "single_label":
            if self.loss.name != "cross_entropy":
                raise ValueError(f"loss.name: {self.loss.name} needs task: multilabel "
                                 "(single-label uses cross_entropy)")
            if self.trainer.monitor == "val_map":
                raise ValueError("trainer.monitor: val_map needs task: multilabel")
            return self
        if self.loss.name == "cross_entropy":
            if "name" in self.loss.model_fields_set:
                raise ValueError("loss.name: cross_entropy is single-label; task: multilabel uses bce or asl")
            self.loss.name = "bce"  # the multi-label default
        if "monitor" not in self.trainer.model_fields_set:
            # Threshold-free: the thresholds are chosen after training, on the checkpoint this picks.
            self.trainer.monitor = "val_map"
        for key, (bad, why) in _SINGLE_LABEL_ONLY.items():
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if (value == bad) if bad is not None else bool(value):
                hint = "; photos: --config finetune_photos_multilabel" if key in _PHOTO_PRESET_KEYS else ""
                raise ValueError(f"{key}: {value!r} does not work with task: multilabel ({why}{hint})")
        return self

    def to_plain(self) -> dict[str, Any]:
        """Plain, YAML- and torch.load(weights_only=True)-safe data (tuples become lists)."""
        return self.model_dump(mode="json")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["trainer.epochs=3", "data.augment.hflip=false"] into a nested dict.

    Values are parsed as YAML scalars so `3` is an int, `false` a bool, `[0.5, 1]` a list.
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r}: expected dotted key=value, e.g. trainer.epochs=3")
        try:
            value = _yaml.load(raw, f"override {key[:120]!r}") if raw != "" else ""
        except _yaml.NotYaml:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (`trainer.epochs`, `data.augment.hflip`, ...)."""
    model = model or TrainConfig
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(config_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _nearest_key(key: str) -> str:
    """` (did you mean 'trainer.epochs'?)` for a mistyped key: full-path match first, then the last part."""
    import difflib

    keys = config_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaf[0]]] if leaf else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])[:120] or "<root>"
    if not first["loc"] and first["type"] == "value_error":  # a check across sections names its keys itself
        return f"{origin}: {str(first.get('ctx', {}).get('error', first['msg']))[:300]}"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'{_nearest_key(key)}"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {_GOT.repr(got)})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{origin}: bad value for '{key}': {str(first['msg'])[:200]}{got_text}{more}"


# Values in error lines are user data of any size: at most a few elements, levels and characters.
_GOT = reprlib.Repr()
_GOT.maxlevel, _GOT.maxlist, _GOT.maxtuple, _GOT.maxdict, _GOT.maxset = 2, 4, 4, 4, 4
_GOT.maxstring, _GOT.maxother, _GOT.maxlong = 60, 60, 40


def build_config(data: dict[str, Any], origin: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, origin)) from None


def bundled_configs() -> list[str]:
    """Names of the configs shipped in the package (`--config finetune_photos`)."""
    return sorted(p.stem for p in DEFAULT_CONFIG.parent.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given, or, for a bare name that is no file here (`finetune_photos`, `demo.yaml`),
    the bundled config of that name: presets work from any folder, installed or not."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    bundled = DEFAULT_CONFIG.parent / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return bundled if bundled.is_file() else path


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (a path, or a bundled config's name; the defaults when None) and apply overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = resolve_config_path(path)
        origin = str(path)
        if not path.is_file():
            if not path.exists():
                raise ConfigError(f"{path}: config file not found (bundled configs, usable by name: "
                                  f"{', '.join(bundled_configs())})")
            raise ConfigError(f"{path}: not a regular file")
        if path.stat().st_size > _yaml.MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a config file is at most {_yaml.MAX_BYTES}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        loaded = _yaml.load(text, str(path))  # bounded: alias bombs and huge files are one-line errors
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        data = loaded or {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        origin = f"{origin} + overrides"
    return build_config(data, origin)


def with_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of `config` with dotted `key=value` overrides applied and validated."""
    if not overrides:
        return config
    return build_config(_deep_merge(config.to_plain(), parse_overrides(overrides)), "config + overrides")


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_plain(), sort_keys=False))

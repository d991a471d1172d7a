"""The Python API: the same stages as the CLI, for notebooks and scripts.

    import imgclf

    data = imgclf.download(["photos/"], "data")                  # folders, archives, URL tables
    run = imgclf.train("data", "runs/r1", epochs=5)               # -> Run (also runs/r1 on disk)
    metrics = imgclf.evaluate(run)                                # -> dict, the content of metrics.json
    model = imgclf.load(run)                                      # run, checkpoint, .onnx or TorchScript
    model.predict("photo.jpg").label                              # or a list, PIL images, arrays, bytes, URLs

The CLI is a thin layer over the stages these functions call, so a notebook and a shell script
produce the same run directory. Errors are the same one-line ImgclfError subclasses.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError
from imgclf.prediction import Prediction

if TYPE_CHECKING:
    import pandas as pd

    from imgclf.config import TrainConfig
    from imgclf.download import DownloadResult
    from imgclf.export import ExportResult
    from imgclf.inference import Classifier

PathLike = str | Path


# ---------------------------------------------------------------- download


def download(sources: PathLike | Sequence[PathLike], out: PathLike, **options: Any) -> DownloadResult:
    """Turn image folders, archives and URL tables into a data directory (see `imgclf download --help`).

    `options` are DownloadOptions fields (concurrency=32, resize="none", ...); the progress bar is
    shown and the summary table is not printed unless `print_summary=True`.
    """
    from imgclf import download as stage

    if isinstance(sources, str | Path):
        sources = [sources]
    options.setdefault("print_summary", False)
    try:
        opts = stage.DownloadOptions(**options)
    except TypeError as err:
        raise ConfigError(f"download: {err}") from None
    return stage.run([Path(s) for s in sources], out, opts)


# ---------------------------------------------------------------- train


def _shortcut_keys(keys: dict[str, Any]) -> list[str]:
    """`epochs=3, arch="resnet18"` -> ["trainer.epochs=3", "model.arch=resnet18"] for unambiguous leaf names."""
    import yaml

    from imgclf.config import config_keys

    by_leaf: dict[str, list[str]] = {}
    for key in config_keys():
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    out = []
    for name, value in keys.items():
        dotted = name.replace("__", ".")
        if "." not in dotted:
            found = by_leaf.get(dotted, [])
            if len(found) != 1:
                where = f"one of {', '.join(found)}" if found else "no config key"
                raise ConfigError(f"train: keyword {name!r} is {where}; pass overrides={{'section.key': value}}")
            dotted = found[0]
        out.append(f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def _overrides(overrides: dict[str, Any] | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return _shortcut_keys(overrides)
    return [str(o) for o in overrides]


@dataclass(frozen=True)
class Run:
    """A run directory (what `imgclf train` wrote); `Run.open(path)` for an existing one."""

    path: Path
    class_names: list[str]
    best_checkpoint: Path
    best_score: float | None
    epochs_run: int | None

    @classmethod
    def open(cls, path: PathLike) -> Run:
        from imgclf.errors import DataError
        from imgclf.rundir import RunDir

        rd = RunDir(Path(path))
        info = rd.read_info()
        if info is None:
            raise DataError(f"{path}: not a run directory (no run.json)")
        return cls(rd.path, info.class_names, rd / info.best_checkpoint, info.best_score, info.epochs_run)

    def evaluate(self, **options: Any) -> dict[str, Any]:
        return evaluate(self.path, **options)

    def load(self, backend: str = "auto") -> Model:
        return load(self.path, backend)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per epoch (metrics.csv)."""
        import pandas as pd

        from imgclf.rundir import RunDir

        return pd.read_csv(RunDir(self.path).metrics)

    def __fspath__(self) -> str:  # a Run goes wherever a path does
        return str(self.path)


def train(data: PathLike, out: PathLike, config: PathLike | TrainConfig | None = None, *,
          overrides: dict[str, Any] | Sequence[str] | None = None, resume: bool = False, **keys: Any) -> Run:
    """Train on a data directory into a new run directory; returns the Run.

    `config`: a YAML file, a TrainConfig, or None for the defaults. Overrides: `overrides=
    {"trainer.epochs": 3}` or ["trainer.epochs=3"], or keywords for unambiguous keys (`epochs=3`,
    `arch="resnet18"`, `lr=1e-3`, `trainer__epochs=3`).
    """
    from imgclf import train as stage
    from imgclf.config import TrainConfig, load_config, with_overrides

    extra = _overrides(overrides) + _shortcut_keys(keys)
    if isinstance(config, TrainConfig):
        resolved = with_overrides(config, extra)
    else:
        resolved = load_config(config, extra)
    result = stage.run(resolved, Path(data), Path(out), resume=resume)
    return Run(result.run_dir, result.class_names, result.best_checkpoint, result.best_score, result.epochs_run)


# ---------------------------------------------------------------- evaluate, export


def evaluate(model: PathLike | Run, data: PathLike | None = None, *, split: str = "test",
             out: PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Metrics with intervals and baselines, plots and report.html; returns metrics.json's content."""
    from imgclf import evaluate as stage

    try:
        opts = stage.EvaluateOptions(model=Path(model), data=None if data is None else Path(data), split=split,
                                     out=None if out is None else Path(out), **options)
    except TypeError as err:
        raise ConfigError(f"evaluate: {err}") from None
    return stage.run(opts)


def export(model: PathLike | Run, output: PathLike | None = None, format: str | None = None) -> ExportResult:  # noqa: A002
    """An ONNX or TorchScript file with class names and preprocessing inside (format from the suffix)."""
    from imgclf import export as stage

    return stage.run(Path(model), format, None if output is None else Path(output))


# ---------------------------------------------------------------- load and predict


ImageLike = Any  # a path or URL (str/Path), a PIL image, an HxWxC uint8 array, or encoded bytes


class Model:
    """A loaded model (`imgclf.load`): class names, preprocessing, and `predict`."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @property
    def class_names(self) -> list[str]:
        return list(self.classifier.class_names)

    def __repr__(self) -> str:
        return (f"Model({self.classifier.source!r}, backend={self.classifier.backend.name}, "
                f"classes={len(self.classifier.class_names)})")

    def predict(self, images: ImageLike | Iterable[ImageLike], top_k: int = 5,
                batch_size: int = 64) -> Prediction | list[Prediction]:
        """Classify one image (returns a Prediction) or many (returns a list, in input order)."""
        single = _is_single(images)
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            results.extend(self._predict_batch(items[start:start + batch_size], top_k))
        return results[0] if single else results

    def _predict_batch(self, items: list[ImageLike], top_k: int) -> list[Prediction]:
        """Paths and URLs go through predict's own reader; in-memory images through the one validator."""
        from imgclf import predict as stage
        from imgclf.predict._inputs import Input, is_url

        named = [Input(str(i), "url" if is_url(str(i)) else "file") for i in items if isinstance(i, str | Path)]
        options = stage.PredictOptions(top_k=top_k, progress=False)
        from_files = iter(stage.predict(named, self.classifier, options) if named else [])
        in_memory = [_prepare_in_memory(i, self.classifier) for i in items if not isinstance(i, str | Path)]
        tensors = [t for t in in_memory if not isinstance(t, str)]
        probs = iter(self.classifier.probabilities(tensors) if tensors else [])
        prepared = iter(in_memory)
        out = []
        for item in items:
            if isinstance(item, str | Path):
                pred = next(from_files)
                out.append(pred)
                continue
            value = next(prepared)
            out.append(Prediction(_describe(item), [], value) if isinstance(value, str)
                       else Prediction(_describe(item), self.classifier.top_k(next(probs), top_k)))
        return out


def _prepare_in_memory(item: Any, classifier: Classifier) -> Any:
    """A preprocessed input tensor, or the reason the item is not a usable image."""
    import numpy as np
    from PIL import Image

    from imgclf.images import Rejected, decode_image
    from imgclf.inference import PREDICT_LIMITS

    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            return f"not_image: an array must be HxW or HxWxC uint8 (got {item.dtype} {item.shape})"
        item = Image.fromarray(item)
    if isinstance(item, Image.Image):
        buf = io.BytesIO()  # through the one validator, so a notebook image is read exactly like a file
        item.save(buf, format="PNG")
        item = buf.getvalue()
    if not isinstance(item, bytes | bytearray):
        return (f"not_image: cannot classify a {type(item).__name__} (give a path, URL, PIL image, "
                "uint8 array or encoded bytes)")
    decoded = decode_image(bytes(item), PREDICT_LIMITS)
    if isinstance(decoded, Rejected):
        return f"{decoded.status}: {decoded.reason}"
    return classifier.prepare(decoded.image)


def _is_single(images: Any) -> bool:
    import numpy as np

    return isinstance(images, str | Path | bytes | bytearray | np.ndarray) or hasattr(images, "getpixel")


def _describe(item: Any) -> str:
    if isinstance(item, bytes | bytearray):
        return f"<{len(item)} bytes>"
    size = getattr(item, "size", None) or getattr(item, "shape", None)
    return f"<{type(item).__name__} {size}>"


def load(model: PathLike | Run, backend: str = "auto") -> Model:
    """Open a run directory, checkpoint, .onnx or TorchScript file for prediction."""
    from imgclf.inference import load_classifier

    return Model(load_classifier(Path(model), backend))

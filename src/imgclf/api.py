"""The Python API: the same stages as the CLI, as plain functions for notebooks and scripts.

    import imgclf

    data = imgclf.download(["photos/"], "data")                  # folders, archives, URL tables
    run = imgclf.train("data", "runs/r1", epochs=5)               # -> Run (also runs/r1 on disk)
    metrics = imgclf.evaluate(run)                                # reads as metrics.json's dict: metrics["f1_macro"]
    imgclf.predict(run, "photo.jpg").label                        # or a list, PIL images, arrays, bytes, URLs
    model = imgclf.load(run)                                      # run, checkpoint, .onnx or TorchScript

Each function has its own signature and docstring (`help(imgclf.train)`) and imports its
stage when called, so `import imgclf` loads no torch. The CLI is a thin layer over the same
stages, so a notebook and a shell script produce the same run directory, and errors are the
same one-line ImgclfError subclasses (a missing extra names its `pip install 'imgclf[...]'`).
Progress: where nothing is set up to show imgclf's log lines (a notebook, a plain script),
a call shows them on stderr while it runs: one line per epoch in training.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError, missing_extra, require
from imgclf.prediction import Prediction

if TYPE_CHECKING:
    import pandas as pd

    from imgclf.audit import AuditResult
    from imgclf.config import TrainConfig
    from imgclf.download import DownloadResult
    from imgclf.evaluate import EvaluateResult
    from imgclf.export import ExportResult
    from imgclf.inference import Classifier

PathLike = str | Path

__all__ = ["download", "audit", "train", "evaluate", "predict", "export", "load", "Run", "Model", "Prediction"]


@contextlib.contextmanager
def _shown() -> Iterator[None]:
    """imgclf's INFO lines (the per-epoch line, progress lines) on stderr during a call, unless logging is set up.

    A notebook sets up no logging, and Python then drops INFO records: training printed
    nothing. An application that set up logging (a root or an imgclf handler) keeps its choice.
    A missing optional package becomes the one-line error with its pip hint.
    """
    logger = logging.getLogger("imgclf")
    handler, old_level = None, logger.level
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:  # a level the user set stays
            logger.setLevel(logging.INFO)
    try:
        yield
    except ModuleNotFoundError as err:
        raise (missing_extra(err) or err) from None
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


# ---------------------------------------------------------------- download


def download(sources: PathLike | Sequence[PathLike], out: PathLike, *, resize: str = "longer", size: int = 512,
             image_format: str = "keep", layout: str = "files", url_col: str | None = None,
             path_col: str | None = None, label_col: str | None = None, split_col: str | None = None,
             progress: bool = True, print_summary: bool = False, **options: Any) -> DownloadResult:
    """Turn image folders, archives and URL tables into a data directory (`imgclf download`).

    sources: folders ([split/]label/image), archives of them, CSV/TSV/Parquet tables (url and/or
    path, label[, split]). out: the data directory (a folder or s3://...). The other keywords are
    the command's options (`imgclf download --help`); more in `options`, as DownloadOptions fields
    (concurrency=32, retries=1, engine="ray", ...). Run it again to resume. Returns the
    DownloadResult (counts per status, the manifest's path).
    """
    if isinstance(sources, str | Path):
        sources = [sources]
    fields = dict(sources=tuple(Path(s) for s in sources), out=out, resize=resize, size=size,
                  image_format=image_format, layout=layout, url_col=url_col,
                  path_col=path_col, label_col=label_col, split_col=split_col, show_progress=progress,
                  print_summary=print_summary, **options)
    with _shown():
        from imgclf.download import DownloadOptions, run

        try:
            opts = DownloadOptions(**fields)
        except TypeError as err:
            raise ConfigError(f"download: {err}") from None
        return run(opts)


# ---------------------------------------------------------------- audit


def audit(data: PathLike, out: PathLike, *, model: PathLike | None = None, config: PathLike | None = None,
          overrides: Sequence[str] = (), folds: int = 5, relabel: bool = False, apply: bool = False,
          seed: int = 0, **options: Any) -> AuditResult:
    """Find likely label errors, near-duplicates, train/test leakage and outliers (`imgclf audit`).

    data: a data directory written by download. out: the audit folder (audit.csv, audit.json,
    audit.html). model: embed with this model; None trains one briefly on the data (with
    `config` and key=value `overrides`). apply=True writes the actions into the manifest.
    More in `options`, as AuditOptions fields (batch_size, filter_by, max_self_confidence, ...).
    Returns an AuditResult, which reads as audit.json's dict (`result["counts"]`), with the files written
    and `summary()`. Needs `pip install 'imgclf[audit]'`.
    """
    require("cleanlab", "imagehash", "faiss")
    with _shown():
        from imgclf.audit import AuditOptions, run
        from imgclf.storage import location

        try:
            opts = AuditOptions(data=location(data), out=Path(out), model=None if model is None else Path(model),
                                config=None if config is None else Path(config), overrides=tuple(overrides),
                                folds=folds, relabel=relabel, apply=apply, seed=seed, **options)
        except TypeError as err:
            raise ConfigError(f"audit: {err}") from None
        return run(opts)


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

    def evaluate(self, **options: Any) -> EvaluateResult:
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
    """Train on a data directory (a folder or s3://...) into a new run directory (`imgclf train`); returns the Run.

    `config`: a YAML file, a TrainConfig, or None for the defaults. Overrides: `overrides=
    {"trainer.epochs": 3}` or ["trainer.epochs=3"], or keywords for unambiguous keys (`epochs=3`,
    `arch="resnet18"`, `lr=1e-3`, `trainer__epochs=3`).
    In a notebook each epoch prints one line (loss, metrics, time). Interrupt the kernel to stop:
    `resume=True` continues from the last finished epoch.
    """
    from imgclf.config import TrainConfig, load_config, with_overrides

    extra = _overrides(overrides) + _shortcut_keys(keys)
    if isinstance(config, TrainConfig):
        resolved = with_overrides(config, extra)
    else:
        resolved = load_config(config, extra)
    with _shown():
        from imgclf.pipeline import data_for_training
        from imgclf.train import TrainOptions, run

        result = run(TrainOptions(resolved, data_for_training(data, out), Path(out), resume=resume))
    return Run(result.run_dir, result.class_names, result.best_checkpoint, result.best_score, result.epochs_run)


# ---------------------------------------------------------------- evaluate, export


def evaluate(model: PathLike | Run, data: PathLike | None = None, *, split: str = "test",
             out: PathLike | None = None, tta: str = "none", batch_size: int = 128, device: str = "auto",
             seed: int = 0, progress: bool = True, **options: Any) -> EvaluateResult:
    """Metrics with intervals and baselines, plots and report.html (`imgclf evaluate`).

    Returns an EvaluateResult, which reads as metrics.json's dict (`result["f1_macro"]`), with the
    files written and `summary()` (what the command prints).

    model: a Run, run directory, checkpoint, .onnx or TorchScript file. data: the data directory
    (default: the run's own). out: where to write (default: the run directory). tta: none, flip
    or crops. More in `options`, as EvaluateOptions fields (num_workers, bootstrap_resamples, ...).
    """
    from imgclf.rundir import require_model

    require_model(Path(model))  # a typo in the model is named before anything asks for data
    with _shown():
        from imgclf.evaluate import EvaluateOptions, run

        try:
            opts = EvaluateOptions(model=Path(model), data=None if data is None else str(data), split=split,
                                   out=None if out is None else Path(out), tta=tta, batch_size=batch_size,
                                   device=device, seed=seed, progress=progress, **options)
        except TypeError as err:
            raise ConfigError(f"evaluate: {err}") from None
        return run(opts)


def export(model: PathLike | Run, output: PathLike | None = None, format: str | None = None, *,  # noqa: A002
           quantize: str | None = None, calibration_data: PathLike | None = None,
           calibration_images: int = 256, held_out_images: int = 2000) -> ExportResult:
    """An ONNX or TorchScript file with class names and preprocessing inside (`imgclf export`).

    format: onnx or torchscript (default: from output's suffix, else onnx); output defaults to
    RUN_DIR/model.onnx (model.int8.onnx with quantize). The file is checked against PyTorch before
    it is kept. quantize="int8": onnxruntime quantisation, static with `calibration_data` (a data
    directory; its test/val split then judges int8 against fp32), else dynamic. ONNX needs
    `pip install 'imgclf[export]'`.
    """
    from imgclf.rundir import require_model

    require_model(Path(model))
    with _shown():
        from imgclf.export import ExportOptions, QuantizeOptions, resolve_format, run

        options = ExportOptions(Path(model), format, None if output is None else Path(output), quantize,
                                QuantizeOptions(calibration_data, calibration_images, held_out_images))
        if resolve_format(options.format, options.out) == "onnx":
            require("onnx", "onnxruntime")
        return run(options)


# ---------------------------------------------------------------- load and predict


ImageLike = Any  # a path or URL (str/Path), a PIL image, an HxWxC uint8 array, or encoded bytes


class Model:
    """A loaded model (`imgclf.load`): class names, preprocessing, and `predict`."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    @property
    def class_names(self) -> list[str]:
        return list(self.classifier.class_names)

    @property
    def task(self) -> str:
        """"multilabel" (a set of labels per image, `Prediction.labels`) or "single_label"."""
        return "multilabel" if self.classifier.multilabel else "single_label"

    @property
    def thresholds(self) -> dict[str, float] | None:
        """A multi-label model's per-label thresholds (chosen on the validation split); None otherwise."""
        t = self.classifier.thresholds
        return None if t is None else dict(zip(self.classifier.class_names, t, strict=True))

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
        from imgclf.predict import PredictOptions
        from imgclf.predict import predict as predict_stage
        from imgclf.predict._inputs import Input, is_url

        named = [Input(str(i), "url" if is_url(str(i)) else "file") for i in items if isinstance(i, str | Path)]
        options = PredictOptions(top_k=top_k, progress=False)
        from_files = iter(predict_stage(named, self.classifier, options) if named else [])
        in_memory = [_prepare_in_memory(i, self.classifier) for i in items if not isinstance(i, str | Path)]
        tensors = [t for t in in_memory if not isinstance(t, str)]
        outs = iter(self.classifier.outputs(self.classifier.probabilities(tensors), top_k) if tensors else [])
        prepared = iter(in_memory)
        out = []
        for item in items:
            if isinstance(item, str | Path):
                pred = next(from_files)
                out.append(pred)
                continue
            value = next(prepared)
            if isinstance(value, str):
                out.append(Prediction(_describe(item), [], value))
            else:
                top, labels = next(outs)  # labels: a multi-label model's set above its thresholds
                out.append(Prediction(_describe(item), top, labels=labels))
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
    """Open a Run, run directory, checkpoint, .onnx or TorchScript file for prediction.

    backend: auto (the file's own), torch, onnx or torchscript. Returns a Model: `class_names`,
    `predict(images, top_k=5)`.
    """
    from imgclf.rundir import require_model

    require_model(Path(model))
    with _shown():
        from imgclf.inference import load_classifier

        return Model(load_classifier(Path(model), backend))


def predict(model: PathLike | Run | Model, images: ImageLike | Iterable[ImageLike], *, top_k: int = 5,
            batch_size: int = 64, backend: str = "auto") -> Prediction | list[Prediction]:
    """Classify one image (returns a Prediction) or many (a list, in input order) (`imgclf predict`).

    model: a Model from `load`, or what `load` opens (loaded for this call). images: paths, URLs,
    PIL images, HxWxC uint8 arrays or encoded bytes. An unusable image gets a Prediction with
    no label and its status and error; the others go on. Many files or a table into a CSV:
    `imgclf predict INPUTS --model MODEL -o out.csv`.
    """
    loaded = model if isinstance(model, Model) else load(model, backend)
    with _shown():
        return loaded.predict(images, top_k=top_k, batch_size=batch_size)

"""Export stage: a run's checkpoint -> one self-describing ONNX or TorchScript file.

    imgclf export --model RUN_DIR --format onnx          # RUN_DIR/model.onnx
    imgclf export --model RUN_DIR --format torchscript   # RUN_DIR/model.torchscript

The exported graph takes a normalised float batch (N, 3, H, W), N dynamic, and returns
`logits` and `probabilities` (softmax). Everything else inference needs travels inside the
file as metadata (class names, input size, resize/crop sizes, mean/std, interpolation):
ONNX `metadata_props` (key "imgclf", JSON, plus readable flat keys) or a TorchScript extra
file `imgclf.json`. `predict --backend onnx|torchscript` and `serve` read it back with
`imgclf.modelfile` and preprocess with `presets.eval_transform`, exactly as training evaluated.

ONNX uses torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default in
torch 2.9+) with a dynamic batch dimension; if it fails on an unusual architecture we fall
back to the legacy TorchScript-based exporter and record which one ran in the metadata.
After writing, the file is loaded back and compared with PyTorch on a probe batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf._files import atomic_path
from imgclf.checkpoint import LoadedModel, load_model
from imgclf.errors import ConfigError, DataError, ImgclfError, first_line
from imgclf.modelfile import METADATA_KEY, TORCHSCRIPT_EXTRA, ModelKind, identify, load_torchscript
from imgclf.presets import Preprocessing, normalize
from imgclf.version import __version__

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
# What each output suffix means; anything else is refused rather than written in the wrong format.
FORMAT_OF_SUFFIX = {".onnx": "onnx", ".torchscript": "torchscript", ".ts": "torchscript", ".pt": "torchscript"}
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    exporter: str
    max_abs_diff: float  # exported vs PyTorch probabilities on a probe batch


class WithProbabilities(nn.Module):
    """The classifier plus its softmax, so an exported file answers with probabilities directly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def metadata(loaded: LoadedModel, exporter: str) -> dict[str, Any]:
    return {
        "format": 1,
        "imgclf_version": __version__,
        "arch": loaded.config.model.arch,
        "class_names": list(loaded.class_names),
        "preprocessing": loaded.preprocessing.to_plain(),
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "normalized": True},
        "outputs": ["logits", "probabilities"],
        "exporter": exporter,
    }


def _probe(pre: Preprocessing, n: int = 3) -> torch.Tensor:
    # Random uint8 pixels through the checkpoint's own normalisation (presets.normalize, as every
    # consumer uses it): inputs in exactly the range the model sees.
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, pre.image_size, pre.image_size), dtype=torch.uint8, generator=gen)
    return normalize(pre)(pixels)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress, INFO logs and deprecation warnings nobody can act on."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _onnx_export(wrapped: nn.Module, probe: torch.Tensor, path: Path, dynamo: bool) -> None:
    names = {"input_names": ["input"], "output_names": ["logits", "probabilities"]}
    with _quiet():
        if dynamo:
            torch.onnx.export(wrapped, (probe,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **names)
        else:
            axes = {name: {0: "batch"} for name in ("input", "logits", "probabilities")}
            torch.onnx.export(wrapped, (probe,), str(path), dynamo=False, opset_version=17,
                              dynamic_axes=axes, **names)


def export_onnx(loaded: LoadedModel, out: Path) -> ExportResult:
    import onnx
    import onnxruntime as ort

    wrapped = WithProbabilities(loaded.model).eval()
    probe = _probe(loaded.preprocessing)
    try:
        _onnx_export(wrapped, probe, out, dynamo=True)
        exporter = "torch.onnx dynamo"
    except Exception as err:  # the dynamo exporter fails on some graphs; the legacy one often copes
        log.warning("dynamo ONNX exporter failed (%s); using the legacy exporter", first_line(err, 160))
        _onnx_export(wrapped, probe, out, dynamo=False)
        exporter = "torch.onnx legacy (TorchScript-based)"
    model = onnx.load(str(out))
    meta = metadata(loaded, exporter)
    pre = meta["preprocessing"]
    flat = {METADATA_KEY: json.dumps(meta), "class_names": json.dumps(meta["class_names"]),
            "image_size": str(pre["image_size"]), "resize_size": str(pre["resize_size"]),
            "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]),
            "interpolation": pre["interpolation"]}
    del model.metadata_props[:]
    for key, value in flat.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.doc_string = "imgclf", f"imgclf {meta['arch']} classifier"
    onnx.checker.check_model(model)
    onnx.save(model, str(out))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"input": probe.numpy()})[0]
    return ExportResult(out, "onnx", exporter, _max_diff(wrapped, probe, got))


def export_torchscript(loaded: LoadedModel, out: Path) -> ExportResult:
    wrapped = WithProbabilities(loaded.model).eval()
    probe = _probe(loaded.preprocessing)
    with _quiet(), torch.no_grad():
        # The traced graph keeps no fixed batch size: convolutions and linear layers are shape-generic.
        traced = torch.jit.trace(wrapped, probe)
    exporter = "torch.jit.trace"
    extra = {TORCHSCRIPT_EXTRA: json.dumps(metadata(loaded, exporter))}
    with _quiet():
        torch.jit.save(traced, str(out), _extra_files=extra)
    module, _ = load_torchscript(out)
    other_batch = _probe(loaded.preprocessing, n=5)  # not the traced batch size: proves it is dynamic
    with torch.no_grad():
        got = module(other_batch)[1].numpy()
    return ExportResult(out, "torchscript", exporter, _max_diff(wrapped, other_batch, got))


def _max_diff(wrapped: nn.Module, probe: torch.Tensor, got: np.ndarray) -> float:
    with torch.no_grad():
        want = wrapped(probe)[1].numpy()
    return float(np.abs(want - got).max())


def default_out(model_path: Path, fmt: str) -> Path:
    """RUN_DIR/model.<ext> for a run directory; next to the file for a checkpoint file."""
    if model_path.is_dir():
        return model_path / f"model{SUFFIXES[fmt]}"
    return model_path.with_suffix(SUFFIXES[fmt])


def resolve_format(fmt: str | None, out: Path | None) -> str:
    """The format to write: from --out's suffix when given (it must agree with --format), else --format."""
    if fmt is not None and fmt not in SUFFIXES:
        raise ConfigError(f"export: unknown format {fmt!r} (choose onnx or torchscript)")
    if out is None:
        return fmt or "onnx"
    by_suffix = FORMAT_OF_SUFFIX.get(out.suffix.lower())
    if by_suffix is None:
        known = ", ".join(f"{s} ({f})" for s, f in FORMAT_OF_SUFFIX.items())
        raise ConfigError(f"export: cannot write {out.suffix or 'a file without suffix'} ({out.name}); "
                          f"imgclf writes {known}")
    if fmt is not None and fmt != by_suffix:
        raise ConfigError(f"export: --format {fmt} disagrees with {out.name}, which is a {by_suffix} file name")
    return by_suffix


def run(model_path: str | Path, fmt: str | None = None, out: str | Path | None = None) -> ExportResult:
    """Export a run's best checkpoint (or a checkpoint file); the format follows `out`'s suffix.

    Raises ImgclfError when the exported file disagrees with PyTorch (nothing is written then).
    """
    model_path = Path(model_path)
    out_arg = Path(out) if out is not None else None
    fmt = resolve_format(fmt, out_arg)
    kind = identify(model_path)
    if kind not in (ModelKind.RUN, ModelKind.CHECKPOINT):
        raise DataError(f"{model_path}: already an exported {kind.value} file; export reads a run directory "
                        "or checkpoint (PyTorch weights)")
    loaded = load_model(model_path)
    out_path = out_arg if out_arg is not None else default_out(model_path, fmt)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    with atomic_path(out_path) as tmp:  # nothing is left behind unless the file is complete and checked
        try:
            result = exporter(loaded, tmp)
        except ImgclfError:
            raise
        except Exception as err:  # exporters and checkers raise assorted types; the user needs one line
            raise ImgclfError(f"export: {fmt} export of {loaded.path} failed ({first_line(err)}); "
                              "file not written") from err
        if result.max_abs_diff > PARITY_TOLERANCE:
            raise ImgclfError(f"export: {fmt} output differs from PyTorch by {result.max_abs_diff:.2e} "
                              f"(> {PARITY_TOLERANCE:g}); file not written")
    return ExportResult(out_path, result.format, result.exporter, result.max_abs_diff)

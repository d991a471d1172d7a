"""Export stage: a run's checkpoint -> one self-describing ONNX or TorchScript file.

    imgclf export RUN_DIR --format onnx          # RUN_DIR/model.onnx
    imgclf export RUN_DIR --format torchscript   # RUN_DIR/model.torchscript

The exported graph takes a normalised float batch (N, 3, H, W), N dynamic, and returns
`logits` and `probabilities` (softmax). Everything else inference needs travels inside the
file as metadata (class names, input size, resize/crop sizes, mean/std, interpolation):
ONNX `metadata_props` (key "imgclf", JSON, plus readable flat keys) or a TorchScript extra
file `imgclf.json`. `predict --backend onnx|torchscript` and `serve` read it back with
`read_metadata` and preprocess with `presets.eval_transform`, exactly as training evaluated.

ONNX uses torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default in
torch 2.9+) with a dynamic batch dimension; if it fails on an unusual architecture we fall
back to the legacy TorchScript-based exporter and record which one ran in the metadata.
After writing, the file is loaded back and compared with PyTorch on a probe batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf import __version__
from imgclf.checkpoint import LoadedModel, load_model
from imgclf.errors import DataError, ImgclfError
from imgclf.presets import Preprocessing

log = logging.getLogger(__name__)

METADATA_KEY = "imgclf"
TORCHSCRIPT_EXTRA = "imgclf.json"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportedMeta:
    """What an exported file says about itself."""

    class_names: list[str]
    preprocessing: Preprocessing
    arch: str
    exporter: str


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


def _parse_meta(plain: dict[str, Any], path: Path) -> ExportedMeta:
    try:
        return ExportedMeta(list(plain["class_names"]), Preprocessing.from_plain(plain["preprocessing"]),
                            str(plain.get("arch", "")), str(plain.get("exporter", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: imgclf metadata is incomplete ({err.__class__.__name__}: {err})") from None


def read_onnx_metadata(path: str | Path) -> ExportedMeta:
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises assorted types for a file that is not ONNX
        raise DataError(f"{path}: not a readable ONNX file ({err.__class__.__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise DataError(f"{path}: no '{METADATA_KEY}' metadata; export it with `imgclf export`")
    return _parse_meta(json.loads(props[METADATA_KEY]), path)


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive written by export (a zip with our extra file); checkpoints are not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"/extra/{TORCHSCRIPT_EXTRA}") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, ExportedMeta]:
    path = Path(path)
    extra = {TORCHSCRIPT_EXTRA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still supported
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise DataError(f"{path}: not a loadable TorchScript file ({err.__class__.__name__})") from None
    if not extra[TORCHSCRIPT_EXTRA]:
        raise DataError(f"{path}: no {TORCHSCRIPT_EXTRA} metadata; export it with `imgclf export`")
    return module.eval(), _parse_meta(json.loads(extra[TORCHSCRIPT_EXTRA]), path)


def _probe(pre: Preprocessing, n: int = 3) -> torch.Tensor:
    # Random pixels pushed through the real normalisation: inputs in the range the model expects.
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand((n, 3, pre.image_size, pre.image_size), generator=gen)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


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
        log.warning("dynamo ONNX exporter failed (%s: %s); using the legacy exporter",
                    err.__class__.__name__, str(err).splitlines()[0][:120] if str(err) else "")
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


def run(model_path: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export the run's best checkpoint; raises ImgclfError when the result disagrees with PyTorch."""
    if fmt not in SUFFIXES:
        raise ImgclfError(f"export: unknown format {fmt!r} (choose onnx or torchscript)")
    model_path = Path(model_path)
    loaded = load_model(model_path)
    out_path = Path(out) if out is not None else default_out(model_path, fmt)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    try:  # the finally removes a half-written tmp file, whatever went wrong
        try:
            result = exporter(loaded, tmp)
        except ImgclfError:
            raise
        except Exception as err:  # exporters and checkers raise assorted types; the user needs one line
            first = str(err).splitlines()[0][:200] if str(err) else ""
            raise ImgclfError(f"export: {fmt} export of {loaded.path} failed "
                              f"({err.__class__.__name__}: {first}); file not written") from err
        if result.max_abs_diff > PARITY_TOLERANCE:
            raise ImgclfError(f"export: {fmt} output differs from PyTorch by {result.max_abs_diff:.2e} "
                              f"(> {PARITY_TOLERANCE:g}); file not written")
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out_path, result.format, result.exporter, result.max_abs_diff)


def main(args: argparse.Namespace) -> int:
    result = run(args.run_dir, args.format, args.out)
    print(f"wrote {result.path} ({result.format}, {result.exporter}); "
          f"max |exported - torch| probability on a probe batch: {result.max_abs_diff:.2e}")
    return 0

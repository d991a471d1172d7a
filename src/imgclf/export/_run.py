"""The export stage's work: trace or export the handle's torch module, write the metadata, check
parity by reading the file back through `inference.load`, and (`--quantize int8`) quantise the
ONNX file with onnxruntime and judge it on held-out data. The export package's docstring says what
the file holds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf._files import atomic_path
from imgclf.errors import ConfigError, DataError, ImgclfError, first_line
from imgclf.inference import ModelHandle, load
from imgclf.modelfile import METADATA_KEY, TORCHSCRIPT_EXTRA, ModelKind, identify
from imgclf.presets import Preprocessing, normalize
from imgclf.version import __version__

log = logging.getLogger("imgclf.export")  # the stage's logger, as before this module was split out

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}
# What each output suffix means; anything else is refused rather than written in the wrong format.
FORMAT_OF_SUFFIX = {".onnx": "onnx", ".torchscript": "torchscript", ".ts": "torchscript", ".pt": "torchscript"}
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    exporter: str
    max_abs_diff: float  # exported vs PyTorch probabilities on a probe batch (fp32, before any quantisation)
    quantization: QuantizeReport | None = None  # `--quantize int8`: method and int8-vs-fp32 parity report

    def summary(self) -> str:
        """What `imgclf export` prints: the file, its exporter and parity, and how int8 compares."""
        fp32 = " (fp32, before quantisation)" if self.quantization else ""
        lines = [f"wrote {self.path} ({self.format}, {self.exporter}); max |exported - torch| probability on a "
                 f"probe batch: {self.max_abs_diff:.2e}{fp32}"]
        if (q := self.quantization) is not None:
            lines.append(f"quantised: {q.method}; {q.calibration_images} calibration images; held out: {q.held_out}")
            if q.top1_agreement is not None:
                lines.append(f"int8 vs fp32: top-1 agreement {q.top1_agreement:.2%}; F1-macro {q.f1_fp32:.4f} -> "
                             f"{q.f1_int8:.4f} ({100 * q.f1_change:+.2f} points)")
        return "\n".join(lines)


class WithProbabilities(nn.Module):
    """The classifier plus its softmax (a multi-label model: its per-label sigmoid), so an exported file
    answers with probabilities directly."""

    def __init__(self, model: nn.Module, sigmoid: bool = False) -> None:
        super().__init__()
        self.model = model
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=1)


def metadata(loaded: ModelHandle, exporter: str) -> dict[str, Any]:
    thresholds = loaded.thresholds
    # A multi-label file says so, with the thresholds predict and serve apply; a single-label file's
    # metadata stays exactly as before (no task key).
    task = {} if thresholds is None else {"task": "multilabel", "thresholds": thresholds}
    return {
        "format": 1,
        "imgclf_version": __version__,
        "arch": loaded.arch,
        "class_names": list(loaded.class_names),
        "preprocessing": loaded.preprocessing.to_plain(),
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "normalized": True},
        "outputs": ["logits", "probabilities"],
        "exporter": exporter,
    } | task


def _probe(pre: Preprocessing, n: int = 3) -> torch.Tensor:
    # Random uint8 pixels through the checkpoint's own normalisation (presets.normalize, as every
    # consumer uses it): inputs in exactly the range the model sees.
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, pre.image_size, pre.image_size), dtype=torch.uint8, generator=gen)
    return normalize(pre)(pixels)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress, INFO logs and deprecation warnings nobody can act on."""
    # onnxruntime's quantiser logs at INFO on its own logger and on the root logger.
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx",
                                                     "onnxruntime.quantization", "")]
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


def export_onnx(loaded: ModelHandle, out: Path) -> ExportResult:
    import onnx

    wrapped = WithProbabilities(_module(loaded), sigmoid=loaded.thresholds is not None).eval()
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
    if "task" in meta:  # readable flat keys for a multi-label file, as for the preprocessing
        flat |= {"task": meta["task"], "thresholds": json.dumps(meta["thresholds"])}
    del model.metadata_props[:]
    for key, value in flat.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.doc_string = "imgclf", f"imgclf {meta['arch']} classifier"
    onnx.checker.check_model(model)
    onnx.save(model, str(out))

    got = load(out, "onnx").backend.probabilities(probe.numpy())  # read back as every stage reads it
    return ExportResult(out, "onnx", exporter, _max_diff(wrapped, probe, got))


def export_torchscript(loaded: ModelHandle, out: Path) -> ExportResult:
    wrapped = WithProbabilities(_module(loaded), sigmoid=loaded.thresholds is not None).eval()
    probe = _probe(loaded.preprocessing)
    with _quiet(), torch.no_grad():
        # The traced graph keeps no fixed batch size: convolutions and linear layers are shape-generic.
        traced = torch.jit.trace(wrapped, probe)
    exporter = "torch.jit.trace"
    extra = {TORCHSCRIPT_EXTRA: json.dumps(metadata(loaded, exporter))}
    with _quiet():
        torch.jit.save(traced, str(out), _extra_files=extra)
    other_batch = _probe(loaded.preprocessing, n=5)  # not the traced batch size: proves it is dynamic
    got = load(out, "torchscript").backend.probabilities(other_batch)  # read back as every stage reads it
    return ExportResult(out, "torchscript", exporter, _max_diff(wrapped, other_batch, got))


def _module(loaded: ModelHandle) -> nn.Module:
    if loaded.module is None:  # run() refuses exported files first; this is for direct callers
        raise DataError(f"{loaded.path}: an exported {loaded.kind.value} file has no PyTorch weights to export")
    return loaded.module


def _max_diff(wrapped: nn.Module, probe: torch.Tensor, got: np.ndarray) -> float:
    with torch.no_grad():
        want = wrapped(probe)[1].numpy()
    return float(np.abs(want - got).max())


# --- INT8: onnxruntime's quantisation of the exported fp32 file -----------------------------------

QUANTIZE_MODES = ("int8",)
_HELD_OUT_SPLITS = ("test", "val")  # the split the parity report judges on, in order of preference


@dataclass(frozen=True)
class QuantizeOptions:
    """How `export --quantize int8` quantises: static with calibration images, else dynamic."""

    calibration_data: str | Path | None = None  # a DATA_DIR (manifest + images); None: dynamic
    calibration_images: int = 256  # sampled (seeded) from the rows outside the held-out split
    held_out_images: int = 2000  # of the held-out split, for top-1 agreement and the F1 change
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_images < 1 or self.held_out_images < 1:
            raise ConfigError("export: --calibration-images and --held-out-images must be at least 1")


@dataclass(frozen=True)
class QuantizeReport:
    method: str  # "static QDQ (...)" or "dynamic (...)"
    calibration_images: int
    held_out: str  # "DATA_DIR split test, 2,000 images" or why there is none
    top1_agreement: float | None  # int8 vs fp32 on the held-out images
    f1_fp32: float | None  # F1-macro against the manifest's labels
    f1_int8: float | None

    @property
    def f1_change(self) -> float | None:
        return None if self.f1_int8 is None or self.f1_fp32 is None else self.f1_int8 - self.f1_fp32


def _sample(frame: Any, n: int, seed: int) -> Any:
    return frame if len(frame) <= n else frame.sample(n=n, random_state=seed).sort_index()


def _data_rows(options: QuantizeOptions) -> tuple[Any, Any, str]:
    """(calibration rows, held-out rows, held-out split name) of the calibration DATA_DIR."""
    from imgclf.manifest import read_manifest, usable_rows

    rows = usable_rows(read_manifest(options.calibration_data))
    held = next((s for s in _HELD_OUT_SPLITS if (rows["split"] == s).any()), "")
    calibration = rows[rows["split"] != held] if held else rows
    if calibration.empty:
        raise DataError(f"{options.calibration_data}: no usable image outside the {held} split to calibrate with")
    return (_sample(calibration, options.calibration_images, options.seed),
            _sample(rows[rows["split"] == held], options.held_out_images, options.seed) if held else rows[:0], held)


def _batches(rows: Any, data_dir: str | Path, classifier: Any, size: int = 64) -> Iterator[np.ndarray]:
    """The rows' images through the model's own eval preprocessing (Classifier.prepare_batch)."""
    from imgclf.data import read_image
    from imgclf.manifest import row_refs

    refs = row_refs(rows)
    for start in range(0, len(refs), size):
        yield classifier.prepare_batch([read_image(data_dir, ref) for ref in refs[start:start + size]])


def _quantize_file(fp32: Path, out: Path, calibration: Any, options: QuantizeOptions, classifier: Any) -> str:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.name + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph fusions the quantiser expects
    # Softmax stays float: quantised, the probabilities would come in steps of 1/255.
    softmax = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Softmax"]
    try:
        if calibration is None:
            # Without calibration data only weights can be quantised ahead of time. Dynamic
            # quantisation of convolutions (ConvInteger) measured 8x *slower* than fp32 here, so only
            # the linear layers are quantised: the file shrinks a little, the speed barely moves.
            with _quiet():
                quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            return "dynamic (linear layers' weights int8; no calibration data given)"

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._batches = iter(_batches(calibration, options.calibration_data, classifier))

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._batches, None)
                return None if batch is None else {"input": batch}

        # QDQ, uint8 activations and per-channel int8 weights: onnxruntime's recommended CPU format
        # (it fuses DequantizeLinear -> op -> QuantizeLinear into QLinearConv/QGemm with VNNI kernels).
        with _quiet():
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=softmax)
        return "static QDQ (uint8 activations, per-channel int8 weights, min-max calibration)"
    finally:
        prepared.unlink(missing_ok=True)


def _predicted(classifier: Any, rows: Any, data_dir: str | Path) -> np.ndarray:
    return np.concatenate([classifier.probabilities(b).argmax(1) for b in _batches(rows, data_dir, classifier)])


def _judge(fp32: Path, int8: Path, held_out: Any, data_dir: str | Path) -> tuple[float, float, float]:
    """(top-1 agreement, F1-macro fp32, F1-macro int8) on the held-out rows, through imgclf.inference."""
    from sklearn.metrics import f1_score

    from imgclf.inference import load_classifier

    want, got = (load_classifier(path, "onnx") for path in (fp32, int8))
    index = {name: i for i, name in enumerate(want.class_names)}
    known = held_out[held_out["label"].isin(index)]
    if known.empty:
        raise DataError(f"{data_dir}: no held-out label is one of the model's classes")
    truth = known["label"].map(index).to_numpy()
    base, quant = _predicted(want, known, data_dir), _predicted(got, known, data_dir)
    labels = list(range(len(index)))
    return (float((base == quant).mean()), float(f1_score(truth, base, labels=labels, average="macro")),
            float(f1_score(truth, quant, labels=labels, average="macro")))


def _with_metadata(path: Path, method: str, calibration_images: int) -> None:
    """The quantised file carries the fp32 file's imgclf metadata, plus how it was quantised."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    meta["quantization"] = {"dtype": "int8", "method": method, "calibration_images": calibration_images,
                            "tool": "onnxruntime.quantization"}
    props[METADATA_KEY] = json.dumps(meta)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def quantize_onnx(fp32: Path, out: Path, options: QuantizeOptions) -> QuantizeReport:
    """fp32 ONNX file (written by export) -> int8 file at `out`, judged against fp32 on held-out data."""
    from imgclf.inference import load_classifier

    calibration = held_out = None
    held = ""
    if options.calibration_data is not None:
        calibration, held_out, held = _data_rows(options)
    method = _quantize_file(fp32, out, calibration, options, load_classifier(fp32, "onnx"))
    # quantize_* copy metadata_props from the input model in current onnxruntime; set them anyway.
    n_calibration = 0 if calibration is None else len(calibration)
    _with_metadata(out, method, n_calibration)
    if held_out is None or held_out.empty:
        why = "no calibration data" if options.calibration_data is None else "no test or val split in the data"
        return QuantizeReport(method, n_calibration, f"none ({why})", None, None, None)
    agreement, f1_fp32, f1_int8 = _judge(fp32, out, held_out, options.calibration_data)
    return QuantizeReport(method, n_calibration, f"{options.calibration_data} split {held}, {len(held_out):,} images",
                          agreement, f1_fp32, f1_int8)


def default_out(model_path: Path, fmt: str, quantize: str | None = None) -> Path:
    """RUN_DIR/model.<ext> for a run directory; next to the file for a checkpoint file (model.int8.onnx
    and x.int8.onnx when quantised, so the fp32 file is not replaced)."""
    suffix = (f".{quantize}" if quantize else "") + SUFFIXES[fmt]
    if model_path.is_dir():
        return model_path / f"model{suffix}"
    return model_path.with_suffix(suffix)


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


@dataclass(frozen=True)
class ExportOptions:
    model: Path  # a run directory or checkpoint (PyTorch weights)
    format: str | None = None  # onnx or torchscript; None: from out's suffix, else onnx
    out: Path | None = None  # None: RUN_DIR/model.onnx, model.torchscript or model.int8.onnx
    quantize: str | None = None  # "int8": an int8 ONNX file (QUANTIZE_MODES)
    calibration: QuantizeOptions | None = None  # how int8 quantises (None: dynamic, QuantizeOptions())


def run(options: ExportOptions) -> ExportResult:
    """Export a run's best checkpoint (or a checkpoint file); the format follows `out`'s suffix.

    `quantize="int8"` writes an int8 ONNX file instead (static quantisation calibrated on
    `calibration.calibration_data`, else dynamic), after the fp32 export passed its parity check;
    the result's `quantization` says which method ran and how int8 agrees with fp32 on held-out data.
    Raises ImgclfError when the exported file disagrees with PyTorch (nothing is written then).
    """
    model_path, quantize, quantize_options = Path(options.model), options.quantize, options.calibration
    out_arg = Path(options.out) if options.out is not None else None
    fmt = resolve_format(options.format, out_arg)
    if quantize is not None and (quantize not in QUANTIZE_MODES or fmt != "onnx"):
        raise ConfigError(f"export: --quantize {quantize} needs an ONNX output and one of {', '.join(QUANTIZE_MODES)}")
    if quantize is None and quantize_options is not None and quantize_options.calibration_data is not None:
        raise ConfigError("export: --calibration-data is for --quantize int8")
    kind = identify(model_path)
    if kind not in (ModelKind.RUN, ModelKind.CHECKPOINT):
        raise DataError(f"{model_path}: already an exported {kind.value} file; export reads a run directory "
                        "or checkpoint (PyTorch weights)")
    loaded = load(model_path)
    if quantize and quantize_options is not None and quantize_options.calibration_data is not None \
            and loaded.thresholds is not None:
        raise ConfigError("export: --calibration-data judges int8 by top-1 agreement, which a multilabel model "
                          "does not have; quantise it without calibration data (dynamic)")
    out_path = out_arg if out_arg is not None else default_out(model_path, fmt, quantize)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    report = None
    with atomic_path(out_path) as tmp:  # nothing is left behind unless the file is complete and checked
        target = tmp.with_name(tmp.name + ".fp32.onnx") if quantize else tmp
        try:
            result = _checked_export(exporter, loaded, target, fmt)
            if quantize:
                report = quantize_onnx(target, tmp, quantize_options or QuantizeOptions())
        except ImgclfError:
            raise
        except Exception as err:  # exporters, quantisers and checkers raise assorted types; the user needs one line
            raise ImgclfError(f"export: {fmt} export of {loaded.path} failed ({first_line(err)}); "
                              "file not written") from err
        finally:
            if quantize:
                target.unlink(missing_ok=True)
    return ExportResult(out_path, result.format, result.exporter, result.max_abs_diff, report)


def _checked_export(exporter: Any, loaded: ModelHandle, path: Path, fmt: str) -> ExportResult:
    result = exporter(loaded, path)
    if result.max_abs_diff > PARITY_TOLERANCE:
        raise ImgclfError(f"export: {fmt} output differs from PyTorch by {result.max_abs_diff:.2e} "
                          f"(> {PARITY_TOLERANCE:g}); file not written")
    return result

"""What a model path is, and what an exported model file says about itself (core layer).

Every command that takes a model (evaluate, predict, export, serve, audit, the API's `load`)
names it the same way: a run directory, a checkpoint (.ckpt/.pt), or a file written by
`imgclf export` (ONNX or TorchScript). `identify` tells them apart by content, not by
suffix, and refuses anything else with one line that says what the file is.

Exported files carry their metadata (class names, preprocessing) inside: ONNX
`metadata_props["imgclf"]` (JSON) or a TorchScript extra file `imgclf.json`. Reading an ONNX
file's metadata needs `onnx` or onnxruntime (`onnx_metadata`), never torch, so
`predict --model model.onnx` starts fast.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from imgclf.errors import DataError
from imgclf.presets import Preprocessing
from imgclf.rundir import BEST, LAST

METADATA_KEY = "imgclf"
TORCHSCRIPT_EXTRA = "imgclf.json"


class ModelKind(StrEnum):
    RUN = "run directory"
    CHECKPOINT = "checkpoint"
    ONNX = "ONNX"
    TORCHSCRIPT = "TorchScript"


@dataclass(frozen=True)
class ExportedMeta:
    """What an exported file says about itself."""

    class_names: list[str]
    preprocessing: Preprocessing
    arch: str
    exporter: str
    plain: dict[str, Any] = field(default_factory=dict, compare=False)  # the metadata JSON as stored
    task: str = "single_label"  # or "multilabel": sigmoid outputs, labels at or above `thresholds`
    thresholds: list[float] | None = None  # multilabel: one per class, checked when the file is read


# First bytes of files people point --model at by mistake, so the error can say what they are.
_SIGNATURES = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image?)"), (b"BM", "a BMP image"), (b"PAR1", "a Parquet file"),
    (b"\x1f\x8b", "a gzip file"), (b"SQLite format 3", "an SQLite database"), (b"%PDF", "a PDF document"),
)


def _describe_other(path: Path, head: bytes) -> str:
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if not head:
        return "an empty file"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON/text file"
    if b"\x00" not in head and all(32 <= c < 127 or c in (9, 10, 13) for c in head[:64]):
        return f"a text file ({path.suffix or 'no suffix'})"
    return f"an unknown format (starts with {head[:8]!r})"


def _zip_kind(path: Path) -> ModelKind | str:  # a str says what else the file is
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a damaged zip archive"
    if any(n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}") for n in names):
        return ModelKind.TORCHSCRIPT
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "a TorchScript file without imgclf metadata (not written by `imgclf export`)"
    if any(n.endswith("/data.pkl") for n in names):
        return ModelKind.CHECKPOINT
    return "a zip archive, not a model"


def _looks_like_onnx(path: Path, head: bytes) -> bool:
    # ONNX is a protobuf ModelProto: field 1 (ir_version, varint) comes first in every exporter's output.
    return path.suffix.lower() == ".onnx" or head[:1] == b"\x08"


def identify(path: str | Path) -> ModelKind:
    """The kind of model at `path`; DataError (one line, says what the path is) for anything else."""
    path = Path(path)
    if path.is_dir():
        if any((path / name).is_file() for name in (BEST, LAST)):
            return ModelKind.RUN
        raise DataError(f"{path}: a folder, but not a run directory (no checkpoints/best.ckpt or last.ckpt)")
    if not path.exists():
        raise DataError(f"{path}: no such model (a run directory, checkpoint, .onnx or TorchScript file)")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file, so not a model")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04"):
        kind = _zip_kind(path)
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = ModelKind.CHECKPOINT  # torch.save's legacy (non-zip) pickle format
    elif _looks_like_onnx(path, head):
        kind = ModelKind.ONNX
    else:
        kind = _describe_other(path, head)
    if not isinstance(kind, ModelKind):
        raise DataError(f"{path}: {kind}; a model is a run directory, checkpoint, .onnx or TorchScript file")
    return kind


def _parse_meta(plain: Any, path: Path) -> ExportedMeta:
    try:
        pre = Preprocessing.from_plain(plain["preprocessing"])
        names = [str(n) for n in plain["class_names"]]
        meta = ExportedMeta(names, pre, str(plain.get("arch", "")), str(plain.get("exporter", "")), dict(plain))
        if plain.get("task") != "multilabel":
            return meta
        # Imported for multi-label files only: imgclf.multilabel brings pandas, which single-label ONNX
        # predict never loads (tests/test_inference.py).
        from imgclf.multilabel import TASK, thresholds_of

        return replace(meta, task=TASK, thresholds=thresholds_of(plain, names, path))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: imgclf metadata is incomplete ({err.__class__.__name__}: {err})") from None


def read_onnx_metadata(path: str | Path) -> ExportedMeta:
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises assorted types for a file that is not ONNX
        raise DataError(f"{path}: not a readable ONNX file ({err.__class__.__name__})") from None
    return onnx_metadata({p.key: p.value for p in model.metadata_props}, path)


def onnx_metadata(props: dict[str, str], path: str | Path) -> ExportedMeta:
    """ExportedMeta from an ONNX file's metadata_props, read by `onnx` or by onnxruntime's
    `get_modelmeta().custom_metadata_map` (so an ONNX model can run without importing onnx)."""
    path = Path(path)
    if METADATA_KEY not in props:
        raise DataError(f"{path}: an ONNX file without '{METADATA_KEY}' metadata; export it with `imgclf export`")
    try:
        plain = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError:
        raise DataError(f"{path}: '{METADATA_KEY}' metadata is not JSON") from None
    return _parse_meta(plain, path)


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive written by export (a zip with our extra file); checkpoints are not."""
    path = Path(path)
    try:
        return path.is_file() and _zip_kind(path) == ModelKind.TORCHSCRIPT
    except OSError:
        return False


def load_torchscript(path: str | Path) -> tuple[Any, ExportedMeta]:
    """(torch.jit.ScriptModule in eval mode, its metadata)."""
    import warnings

    import torch

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

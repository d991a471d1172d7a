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

from imgclf.export._run import (
    FORMAT_OF_SUFFIX,
    PARITY_TOLERANCE,
    QUANTIZE_MODES,
    SUFFIXES,
    ExportOptions,
    ExportResult,
    QuantizeOptions,
    QuantizeReport,
    WithProbabilities,
    default_out,
    export_onnx,
    export_torchscript,
    metadata,
    quantize_onnx,
    resolve_format,
    run,
)

__all__ = ["FORMAT_OF_SUFFIX", "PARITY_TOLERANCE", "QUANTIZE_MODES", "SUFFIXES", "ExportOptions", "ExportResult",
           "QuantizeOptions", "QuantizeReport", "WithProbabilities", "default_out", "export_onnx", "export_torchscript",
           "metadata", "quantize_onnx", "resolve_format", "run"]

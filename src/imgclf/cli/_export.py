"""`imgclf export`: arguments and the call into the export stage."""

from __future__ import annotations

import argparse

from imgclf.cli._common import add_model_argument, add_output_argument, one_model
from imgclf.errors import require


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, with metadata",
                       description="Write a self-describing model file (class names and preprocessing as "
                                   "metadata) and check it against PyTorch before keeping it.")
    add_model_argument(p, "export")
    p.add_argument("--format", choices=("onnx", "torchscript"), default=None,
                   help="format of the output file (default: from --output's suffix, else onnx)")
    add_output_argument(p, "export", "output file: .onnx, or .torchscript/.ts/.pt for TorchScript "
                           "(default: RUN_DIR/model.onnx or RUN_DIR/model.torchscript)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf.stages import export

    model = one_model(args)
    if export.resolve_format(args.format, args.output) == "onnx":
        require("onnx", "onnxruntime")  # a missing extra: one line before the export starts
    result = export.run(model, args.format, args.output)
    print(f"wrote {result.path} ({result.format}, {result.exporter}); "
          f"max |exported - torch| probability on a probe batch: {result.max_abs_diff:.2e}")
    return 0

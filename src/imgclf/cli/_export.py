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
    q = p.add_argument_group("INT8 (onnxruntime quantisation; ONNX output only)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="write an int8 model (default name model.int8.onnx): static quantisation calibrated on "
                        "--calibration-data, else dynamic (linear layers only, little faster)")
    q.add_argument("--calibration-data", metavar="DATA_DIR", default=None,
                   help="a data directory (manifest + images): calibration images from outside its test/val "
                        "split, then int8 vs fp32 top-1 agreement and F1-macro on that split")
    q.add_argument("--calibration-images", type=int, default=256, help="images sampled to calibrate")
    q.add_argument("--held-out-images", type=int, default=2000, help="held-out images the parity report judges")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf.stages import export

    options = export.ExportOptions(one_model(args), args.format, args.output, args.quantize, export.QuantizeOptions(
        args.calibration_data, args.calibration_images, args.held_out_images))
    if export.resolve_format(options.format, options.out) == "onnx":
        require("onnx", "onnxruntime")  # a missing extra: one line before the export starts
    print(export.run(options).summary())
    return 0

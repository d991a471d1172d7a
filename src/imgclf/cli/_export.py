"""`imgclf export`: arguments and the call into the export stage."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, with metadata",
                       description="Write a self-describing model file (class names and preprocessing as "
                                   "metadata) and check it against PyTorch before keeping it.")
    p.add_argument("run_dir", type=Path, help="run directory or checkpoint")
    p.add_argument("--format", choices=("onnx", "torchscript"), default=None,
                   help="model format (default: from --out's suffix, else onnx)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file: .onnx, or .torchscript/.ts/.pt for TorchScript "
                        "(default: RUN_DIR/model.onnx or RUN_DIR/model.torchscript)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from imgclf import export

    result = export.run(args.run_dir, args.format, args.out)
    print(f"wrote {result.path} ({result.format}, {result.exporter}); "
          f"max |exported - torch| probability on a probe batch: {result.max_abs_diff:.2e}")
    return 0

"""`imgclf predict`: arguments and the call into the predict stage."""

from __future__ import annotations

import argparse

from imgclf.cli._common import add_model_argument, add_output_argument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify files, folders, globs, URLs or a CSV of them",
                       description="Classify images with a run, a checkpoint or an exported model. "
                                   "Writes one row per input (top-k labels and probabilities); an "
                                   "unreadable input gets its error in its row and the rest go on.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs ('a/**/*.jpg'), "
                                             "http(s) URLs, or a CSV/TSV with a url or path column")
    add_model_argument(p, required=True)
    add_output_argument(p, "output file, .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="format of the output file (default: from --output's suffix, else csv)")
    p.add_argument("--top-k", type=int, default=5, help="labels per row")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "torchscript"), default="auto",
                   help="auto: the model file's own (onnx for .onnx, torchscript for exported TorchScript, "
                        "else torch)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds allowed per URL fetch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os
    import sys

    from imgclf import predict
    from imgclf.net.guard import FetchOptions

    options = predict.PredictOptions(top_k=args.top_k, batch_size=args.batch_size, progress=not args.no_progress,
                                     fetch=FetchOptions(allow_private=True, total_timeout=args.timeout))
    try:
        ok, failed = predict.run(args.inputs, args.model, args.output, args.backend, options, args.format)
    except BrokenPipeError:  # `imgclf predict ... | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at interpreter exit
        return 0
    if failed:
        print(f"imgclf predict: {failed} of {ok + failed} inputs could not be classified "
              "(see the error column)", file=sys.stderr)
    return 0 if ok else 1

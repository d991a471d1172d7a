"""`imgclf predict`: arguments and the call into the predict stage."""

from __future__ import annotations

import argparse

from imgclf.cli._common import add_backend_argument, add_model_argument, add_output_argument
from imgclf.errors import ConfigError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify files, folders, globs, URLs or a CSV of them",
                       description="Classify images with a run, a checkpoint or an exported model. "
                                   "Writes one row per input (top-k labels and probabilities); an "
                                   "unreadable input gets its error in its row and the rest go on.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs ('a/**/*.jpg'), "
                                             "http(s) URLs, or a CSV/TSV with a url and/or path column (as download "
                                             "reads it; its other columns are copied into the output)")
    add_model_argument(p, "predict", required=True)
    add_output_argument(p, "predict", "output file, .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="format of the output file (default: from --output's suffix, else csv)")
    for name in ("url", "path"):
        p.add_argument(f"--{name}-col", default=None, metavar="NAME",
                       help=f"table inputs: column holding the {name} (default: {name}), as in download")
    p.add_argument("--top-k", type=int, default=5, help="labels per row")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_backend_argument(p)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds allowed per URL fetch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--tta", choices=("none", "flip", "crops"), default="none",
                   help="test-time augmentation: average the probabilities of the image and its mirror image "
                        "(flip, 2 passes) or also of 4 shifted crops (crops, 10 passes)")
    ray = p.add_argument_group("many inputs on Ray (pip install 'imgclf[ray]'; inputs may also be data "
                                "directories, local or s3://, whose ok rows are predicted)")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="ray: shards of inputs as Ray tasks, parts in OUTPUT.parts/ merged into -o OUTPUT")
    ray.add_argument("--address", default=None, help="--engine ray: an existing Ray cluster (default: a private "
                                                     "local one on 127.0.0.1, stopped at the end)")
    ray.add_argument("--workers", type=int, default=2, help="--engine ray: worker processes of a private Ray")
    ray.add_argument("--shard-size", type=int, default=1000, help="--engine ray: inputs per task and part file")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os
    import sys

    from imgclf.predict._inputs import TableColumns
    from imgclf.rundir import require_model
    from imgclf.stages import predict

    if args.engine == "ray" and (args.url_col or args.path_col):
        raise ConfigError("--url-col/--path-col: not supported with --engine ray yet (name the columns url and path)")
    options = predict.PredictOptions(
        model=require_model(args.model), inputs=args.inputs, out=args.output, backend=args.backend, format=args.format,
        top_k=args.top_k, batch_size=args.batch_size, progress=not args.no_progress, timeout=args.timeout,
        tta=args.tta, columns=TableColumns(args.url_col, args.path_col))
    try:
        if args.engine == "ray":
            from imgclf.predict import _ray

            result = _ray.run(options, _ray.RayOptions(args.address, args.workers, args.shard_size))
        else:
            result = predict.run(options)
    except BrokenPipeError:  # `imgclf predict ... | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at interpreter exit
        return 0
    if result.summary():  # the rows are the output (stdout or -o); stderr says how many failed
        print(result.summary(), file=sys.stderr)
    return 0 if result.ok else 1

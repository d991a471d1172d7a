"""`imgclf <stage> ...`: one command per pipeline stage.

The CLI only parses arguments, builds the stage's typed options and calls the stage;
stages are imported lazily so `imgclf --help` answers without loading torch.
User errors (ImgclfError) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from imgclf import __version__
from imgclf.errors import ImgclfError

STAGES = ("download", "train", "evaluate", "predict", "export", "serve", "demo")


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch image URLs into validated images + manifest.parquet",
                       description="Download and validate images listed in CSV/TSV/Parquet files "
                                   "(columns url,label[,split]); resumable: run the same command again.")
    p.add_argument("sources", nargs="+", type=Path, help="CSV/TSV/Parquet files; a file stem train/val/test "
                                                          "names the split when there is no split column")
    p.add_argument("--out", required=True, type=Path, help="data directory to write images and manifest into")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight in total (default 64)")
    p.add_argument("--per-host", type=int, default=16, help="requests in flight per host (default 16)")
    p.add_argument("--processes", type=int, default=None,
                   help="processes decoding/validating images (default: number of cores)")
    p.add_argument("--timeout", type=float, default=30.0, help="total deadline per request in seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="connect timeout in seconds")
    p.add_argument("--read-timeout", type=float, default=15.0, help="max seconds between two reads")
    p.add_argument("--retries", type=int, default=3, help="retries for timeouts, resets, 408, 429, 5xx")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="first retry waits up to this many seconds, doubling each time (with jitter)")
    p.add_argument("--max-retry-after", type=float, default=30.0,
                   help="honour a server's Retry-After up to this many seconds")
    p.add_argument("--max-redirects", type=int, default=5)
    p.add_argument("--max-bytes", type=int, default=20_000_000,
                   help="cut bodies larger than this (too_large)")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (bombs)")
    p.add_argument("--min-side", type=int, default=8, help="refuse images with a smaller side (too_small)")
    p.add_argument("--resize", choices=("none", "shorter", "longer"), default="longer",
                   help="resize so that this side is at most --size (default: longer)")
    p.add_argument("--size", type=int, default=512, help="target side for --resize (default 512)")
    p.add_argument("--format", dest="image_format", choices=("keep", "jpeg", "png", "webp"), default="keep",
                   help="re-encode format (keep: store the original bytes when no resize was needed)")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding")
    p.add_argument("--retry-failed", action="store_true", help="try again rows whose failure was retryable")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(handler=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> int:
    from imgclf import download

    options = download.DownloadOptions.from_namespace(args)
    result = download.run(args.sources, args.out, options)
    return 0 if result.total > 0 else 1


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a classifier from a config into a run directory",
                       description="Train from a YAML config on a downloaded data directory. "
                                   "Extra key=value arguments override config keys (trainer.epochs=3).")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", required=True, type=Path, help="data directory written by `imgclf download`")
    p.add_argument("--out", required=True, type=Path, help="run directory to create (or resume)")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt "
                                                          "(with RUN_DIR/config.yaml unless --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from imgclf.config import load_config

    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    config_path = args.config
    if config_path is None and args.resume and (args.out / "config.yaml").is_file():
        config_path = args.out / "config.yaml"  # resume continues with the run's own config
    config = load_config(config_path, overrides)  # before importing torch: config errors answer fast
    from imgclf import train

    train.run(config, args.data, args.out, resume=args.resume)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics, baselines, plots and an HTML report for a run",
                       description="Evaluate a run (or shipped weights) on a split of a data directory.")
    p.add_argument("run_dir", nargs="?", type=Path, help="run directory written by `imgclf train`")
    p.add_argument("--weights", type=Path, default=None, help="evaluate a checkpoint file instead of a run")
    p.add_argument("--data", type=Path, default=None, help="data directory (default: the run's)")
    p.add_argument("--split", default="test", help="split to evaluate (default test; falls back to val)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: the run directory; with --weights: "
                        "DATA_DIR/evaluations/<weights stem>-<split>)")
    p.add_argument("--seed", type=int, default=0, help="seed for bootstrap and baseline simulation")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, mps")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image-decoding worker processes (default: the run config's data.num_workers)")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from imgclf import evaluate

    if args.run_dir is None and args.weights is None:
        raise ImgclfError("evaluate: give a RUN_DIR or --weights FILE")
    metrics = evaluate.run(evaluate.EvaluateOptions.from_namespace(args))
    print(evaluate.format_summary(metrics))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify files, folders, globs, URLs or a CSV of them",
                       description="Classify images with a run, a checkpoint or an exported model. "
                                   "Writes one row per input (top-k labels and probabilities); an "
                                   "unreadable input gets its error in its row and the rest go on.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs ('a/**/*.jpg'), "
                                             "http(s) URLs, or a CSV/TSV with a url or path column")
    p.add_argument("--model", required=True, type=Path,
                   help="run directory, checkpoint (.ckpt/.pt), or a file from `imgclf export`")
    p.add_argument("--out", type=Path, default=None,
                   help="output file, .csv or .jsonl (default: CSV on stdout)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="output format (default: from --out's suffix, else csv)")
    p.add_argument("--top-k", type=int, default=5, help="labels per row (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "torchscript"), default="auto",
                   help="auto: onnx for .onnx files, torchscript for exported TorchScript, else torch")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds allowed per URL fetch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from imgclf import predict

    return predict.main(args)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX or TorchScript, with metadata",
                       description="Write a self-describing model file (class names and preprocessing as "
                                   "metadata) and check it against PyTorch before keeping it.")
    p.add_argument("run_dir", type=Path, help="run directory or checkpoint")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: RUN_DIR/model.onnx or RUN_DIR/model.torchscript)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from imgclf import export

    return export.main(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (FastAPI): /predict, /health, /labels, /",
                       description="HTTP service: POST /predict (multipart image or JSON {\"url\": ...}), "
                                   "GET /health, GET /labels, GET /docs, and a page at /.")
    p.add_argument("--model", required=True, type=Path,
                   help="run directory, checkpoint, or a file from `imgclf export`")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "torchscript"), default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let {'url': ...} fetch private, loopback and link-local addresses")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted request body")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds allowed per URL fetch")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests that arrive together are classified in one batch of at most this size")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="connections served at once; more get HTTP 503 (bounds memory: each holds "
                        "up to --max-upload-mb)")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from imgclf import serve

    return serve.main(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline offline on the bundled Fashion-MNIST sample")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for data and run")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None,
                   help="use at most N images per class and split (a quick look; default: all 4,000)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. trainer.epochs=1)")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from imgclf import demo

    return demo.run(args.out, seed=args.seed, overrides=list(args.overrides), limit=args.limit,
                    show_progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description="From a list of labelled image URLs to an evaluated, deployable image classifier. "
                    "Stages: download -> train -> evaluate -> predict / export / serve; demo runs them all.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(STAGES) + "}")
    adders: list[Callable[[argparse._SubParsersAction], None]] = [
        _add_download, _add_train, _add_evaluate, _add_predict, _add_export, _add_serve, _add_demo,
    ]
    for add in adders:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ImgclfError as err:
        print(f"imgclf {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"imgclf {args.command}: interrupted", file=sys.stderr)
        return 130

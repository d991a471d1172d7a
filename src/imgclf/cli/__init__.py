"""`imgclf <stage> ...`: one command per pipeline stage (one module per command: cli/_<stage>.py).

The CLI only parses arguments, builds the stage's typed options and calls the stage;
stages are imported lazily so `imgclf --help` answers without loading torch.
User errors (ImgclfError) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imgclf import __version__
from imgclf.cli import _demo, _download, _evaluate, _export, _predict, _serve, _train
from imgclf.errors import ImgclfError

STAGES = ("download", "train", "evaluate", "predict", "export", "serve", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description="From a list of labelled image URLs to an evaluated, deployable image classifier. "
                    "Stages: download -> train -> evaluate -> predict / export / serve; demo runs them all.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(STAGES) + "}")
    for module in (_download, _train, _evaluate, _predict, _export, _serve, _demo):
        module.add(sub)
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

"""`imgclf <stage> ...`: one command per pipeline stage (one module per command: cli/_<stage>.py).

The CLI only parses arguments into the stage's one options object, calls `run(options)` and
prints the result's `summary()` (the stages' one contract, docs/architecture.md); stages are
imported lazily so `imgclf --help` answers without loading torch.
User errors (ImgclfError) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imgclf.cli import _audit, _config, _demo, _download, _evaluate, _export, _models, _predict, _serve, _train
from imgclf.cli._common import Parser, add_verbosity
from imgclf.errors import ImgclfError, missing_extra
from imgclf.version import __version__

STAGES = ("download", "audit", "train", "evaluate", "predict", "export", "serve", "demo")
# Commands that are not pipeline stages: helpers around them.
TOOLS = ("config", "models")


COMMANDS = (_download, _audit, _train, _evaluate, _predict, _export, _serve, _demo, _config, _models)


def build_parser() -> Parser:
    parser = Parser(
        prog="imgclf",
        description="From a list of labelled image URLs to an evaluated, deployable image classifier. "
                    "Stages: download -> (audit) -> train -> evaluate -> predict / export / serve; demo runs them all.")
    parser.add_argument("--version", action="version", version=f"imgclf {__version__}")
    add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(STAGES + TOOLS) + "}")
    for module in COMMANDS:
        module.add(sub)
    for command in sub.choices.values():
        add_verbosity(command, top=False)
        command.takes_config_keys = any(a.dest == "overrides" for a in command._actions)
    return parser


def _unknown_option_first(parser: Parser, argv: list[str]) -> None:
    """Report a mistyped option before argparse complains about the required one it was meant to be.

    `predict --modle x` would otherwise fail with "--model is required" and no hint.
    """
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((tok for tok in argv if tok in subparsers.choices), None)
    if command is None:
        return
    sub = subparsers.choices[command]
    known = [s for action in sub._actions + parser._actions for s in action.option_strings]
    for tok in argv[argv.index(command) + 1:]:
        if tok == "--":
            return
        flag = tok.split("=", 1)[0]
        if flag.startswith("--") and not any(k == flag or k.startswith(flag) for k in known):
            sub.error(f"unrecognized arguments: {tok}")


def _parse(parser: Parser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is reported by the subcommand that was meant, with a suggestion."""
    _unknown_option_first(parser, list(sys.argv[1:] if argv is None else argv))
    args, extras = parser.parse_known_args(argv)
    if extras:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        target = subparsers.choices.get(getattr(args, "command", None) or "", parser)
        target.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _log_level(args: argparse.Namespace) -> int:
    return logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=_log_level(args), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ImgclfError as err:
        print(f"imgclf {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except ModuleNotFoundError as err:  # an optional package: one line with its pip install, not a traceback
        extra = missing_extra(err)
        if extra is None:
            raise
        print(f"imgclf {args.command}: error: {extra}", file=sys.stderr)
        return extra.exit_code
    except KeyboardInterrupt as err:  # a stage may say how to go on (train: --resume)
        print(f"imgclf {args.command}: interrupted" + (f"; {err}" if str(err) else ""), file=sys.stderr)
        return 130

"""What every command's parser shares: help that shows defaults, did-you-mean, -v/-q anywhere.

argparse in Python 3.11 neither shows defaults by itself nor suggests a near option; a user
who types `--epoch` deserves `did you mean --epochs?`, not just "unrecognized arguments".
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import NoReturn

USAGE_EXIT = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` to every option that has a meaningful default and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "default" in text.lower()
                or not action.option_strings or isinstance(action, argparse._StoreConstAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def suggestion(word: str, choices: list[str]) -> str:
    """` (did you mean X?)` for the closest choice, or ""."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the nearest valid option or command."""

    # Set on commands that accept dotted config overrides (train, demo, config).
    takes_config_keys = False

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own signature
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _options(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def _config_key_hint(self, option: str) -> str:
        """`--epochs` on a command that takes config overrides: point at `trainer.epochs=...`."""
        if not self.takes_config_keys:
            return ""
        from imgclf.config import config_keys

        by_leaf = {k.rsplit(".", 1)[-1]: k for k in config_keys()}
        leaf = difflib.get_close_matches(option.lstrip("-").replace("-", "_"), list(by_leaf), n=1, cutoff=0.75)
        return f" (a config key? pass it as {by_leaf[leaf[0]]}=VALUE)" if leaf else ""

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            first = unknown.group(1).split()[0].split("=")[0]
            message += suggestion(first, self._options()) or self._config_key_hint(first)
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(3)) or [c.strip() for c in choice.group(3).split(",")]
            message += suggestion(choice.group(2), options)
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def add_verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q on the top parser and on every subcommand, so both `imgclf -v train` and `imgclf train -v` work.

    On subcommands the default is SUPPRESS: an unset flag there must not overwrite the top-level one.
    """
    default: object = 0 if top else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=default, help="more output (debug logging)")
    group.add_argument("-q", "--quiet", action="count", default=default,
                       help="less output: warnings and errors only")


MODEL_HELP = "a run directory, a checkpoint (.ckpt/.pt), or a file written by `imgclf export` (.onnx, TorchScript)"

# The one table of old spellings that still work (Ultralytics' _handle_deprecation habit): each
# use prints one line naming the new spelling. Every hidden option and every old positional is
# here, and docs/architecture.md shows this table (tests/test_cli_grammar.py checks both).
RENAMED: dict[tuple[str, str], str] = {
    ("evaluate", "MODEL"): "--model",  # the model was the first positional argument
    ("export", "MODEL"): "--model",
    ("evaluate", "--weights"): "--model",
    ("audit", "DATA_DIR"): "--data",  # the data directory was positional in audit only
    ("predict", "--out"): "-o/--output",  # --out names a folder everywhere; a single output file is -o
    ("export", "--out"): "-o/--output",
    ("serve", "--fetch-timeout"): "--timeout",
    ("download", "--format"): "--image-format",  # --format names an output file's format everywhere
}


def renamed(command: str, old: str) -> None:
    """The one-line notice for an old spelling (stderr; the command goes on)."""
    new = RENAMED[(command, old)]
    what = f"{old} as a positional argument" if not old.startswith("-") else old
    print(f"imgclf {command}: {what} is an old spelling of {new}; it still works, but use {new}", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old option: stores into the new option's destination and says so."""

    def __init__(self, *args, command: str, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse's own signature
        self.command = command
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        renamed(self.command, str(option_string))
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, command: str, old: str, dest: str, **kwargs: object) -> None:
    """An old spelling from RENAMED, hidden from --help, stored where its new spelling stores."""
    assert (command, old) in RENAMED, f"add ({command!r}, {old!r}) to RENAMED"
    parser.add_argument(old, dest=dest, action=_Renamed, command=command, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def add_model_argument(parser: argparse.ArgumentParser, command: str, required: bool = False) -> None:
    """`--model MODEL`, spelled the same in every command that takes a model.

    evaluate and export took it as their first positional argument: that still works (RENAMED).
    """
    if (command, "MODEL") in RENAMED:
        parser.add_argument("model_pos", nargs="?", type=Path, metavar="MODEL", help=argparse.SUPPRESS)
        parser.add_argument("--model", type=Path, default=None, help=MODEL_HELP)
    else:
        parser.add_argument("--model", type=Path, required=required, help=MODEL_HELP)


class _Backends:
    """argparse `choices` read from the loader's OPENERS when first needed (a --backend given, help, an
    error): a new backend is one entry there, and a command that takes no --backend never imports
    the loader (numpy, Pillow, pydantic) just to build its parser."""

    def _names(self) -> tuple[str, ...]:
        from imgclf.inference import BACKENDS  # ("auto", *OPENERS)

        return BACKENDS

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # noqa: ANN204 - argparse only iterates it for help and error messages
        return iter(self._names())


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """`--backend`, its choices from `imgclf.inference.OPENERS`."""
    parser.add_argument("--backend", choices=_Backends(), default="auto", metavar="BACKEND",
                        help="%(choices)s; auto: the model file's own (onnx for .onnx, torchscript for exported "
                             "TorchScript, else torch)")


def one_model(args: argparse.Namespace) -> Path:
    """The one model named by --model or an old spelling; a usage error for none or two; a clear one for a typo."""
    from imgclf.errors import ConfigError
    from imgclf.rundir import require_model

    if getattr(args, "model_pos", None) is not None:
        renamed(args.command, "MODEL")
    given = [v for v in (getattr(args, "model_pos", None), args.model, getattr(args, "model_old", None))
             if v is not None]
    if len(given) != 1:
        raise ConfigError("name one model: --model MODEL (" + MODEL_HELP + ")" if not given else
                          f"two models given ({given[0]} and {given[1]}); name one")
    return require_model(given[0])


def add_output_argument(parser: argparse.ArgumentParser, command: str, help_text: str) -> None:
    """`-o/--output FILE` for commands that write one file (`--out` is a folder everywhere; its old use here works)."""
    parser.add_argument("-o", "--output", type=Path, default=None, help=help_text)
    add_renamed(parser, command, "--out", dest="output", type=Path)

"""`imgclf config`: print the resolved training config, or the documented defaults.

The resolved config is exactly what `imgclf train` with the same --config and key=value
arguments would train with (and writes to RUN_DIR/config.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved train config (defaults + file + overrides)",
                       description="Print the config `imgclf train` would use, as YAML: the defaults, then "
                                   "--config FILE, then key=value overrides. --documented prints every key "
                                   "with its default and a comment saying what it does.")
    p.add_argument("--config", type=Path, default=None, help="YAML config file to resolve")
    p.add_argument("--documented", action="store_true",
                   help="print the documented defaults (configs/default.yaml) instead")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import yaml

    from imgclf.config import DEFAULT_CONFIG, load_config

    if args.documented:
        print(DEFAULT_CONFIG.read_text(encoding="utf-8"), end="")
        return 0
    config = load_config(args.config, list(args.overrides))
    print(yaml.safe_dump(config.to_plain(), sort_keys=False), end="")
    return 0

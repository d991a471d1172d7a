"""YAML from users, read with bounded work: the one loader for config files and overrides (core).

`yaml.safe_load` is safe from code execution, not from work: anchors and aliases let 20 lines
stand for 387 million values ("billion laughs": nine aliases of nine aliases ... nine levels
deep). PyYAML builds that as a small graph of shared objects, and then validation, merging and
error messages walk it as a tree and hang, or print a 254 MB line. `load` refuses, before any
value is built, a document whose tree (aliases expanded) holds more than MAX_NODES nodes, or that
refers to itself, a document nested more than MAX_DEPTH levels, and a text over MAX_BYTES.
Errors are one bounded line (ConfigError).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from imgclf.errors import ConfigError

MAX_BYTES = 64 * 1024  # a full config is 6 KB; PyYAML parses ~30k values a second, so this is ~2 s at most
MAX_NODES = 10_000  # a full config is about 60 values; aliases may repeat parts, not multiply them
MAX_DEPTH = 64  # nesting levels (a config has 3); deeper documents exhaust Python's stack


class _TooMuch(Exception):
    pass


class NotYaml(ConfigError):
    """The text does not parse as YAML (an override's value is then taken as a plain string)."""


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def expanded_nodes(root: Node, limit: int = MAX_NODES) -> int:
    """Nodes in the tree `root` stands for, aliases expanded, counted over the shared graph (linear
    in its size, not the tree's); _TooMuch past `limit` or when a node contains itself."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested document must not exhaust Python's stack
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                raise _TooMuch(f"it holds more than {limit} values (aliases expanded)")
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise _TooMuch("an alias refers to a value that contains it")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting while scanning, and checks the composed document's
    expanded size before constructing it."""

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise _TooMuch(f"nested more than {MAX_DEPTH} levels deep")
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_DEPTH:
            raise _TooMuch(f"nested more than {MAX_DEPTH} levels deep")
        return super().add_indent(column)

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            expanded_nodes(node)
        return node


def load(text: str, origin: str) -> Any:
    """The YAML value of `text` (a config file's content or an override's value), bounded."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{origin}: {len(text)} characters; a config is at most {MAX_BYTES}")
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooMuch as err:
        raise ConfigError(f"{origin}: refused, {err}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: refused, nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise NotYaml(f"{origin}:{where} not valid YAML") from None

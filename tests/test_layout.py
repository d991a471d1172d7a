"""The layout keeps its promises: imports go one way (cli -> stages -> core) without circles or
private back-imports, modules stay small, and the run directory's contract is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from imgclf.rundir import RunInfo

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
DOCS = Path(__file__).resolve().parents[1] / "docs"
# The user's entry points: they may import any stage. __init__ is imgclf/__init__.py (the API's face).
TOP = {"cli", "api", "demo", "__main__", "__init__", "stages", "pipeline"}
STAGES = {"download", "train", "evaluate", "predict", "export", "serve", "audit"}
MAX_LINES = 450  # "no module over ~400 lines", with a little slack for docstrings
# Stage-to-stage imports that are the point of the stage, not a shortcut around a core module.
ALLOWED = {("audit", "train"): "audit without --model trains k-fold models with the train stage"}


def _unit(path: Path) -> str:
    """The first name under imgclf/ (a package or a module): cli, train, manifest, ..."""
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path) -> set[str]:
    """Every imgclf unit `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "imgclf" else [f"imgclf.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "imgclf" and len(parts) > 1:
                found.add(parts[1])
    return found


def _layer(unit: str) -> str:
    return "top" if unit in TOP else "stage" if unit in STAGES else "core"


def test_imports_go_one_way() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        for target in _imports(path) - {unit}:
            src_layer, dst_layer = _layer(unit), _layer(target)
            if dst_layer == "top" and src_layer != "top":
                wrong.append(f"{path.relative_to(SRC)} ({src_layer}) imports imgclf.{target} (top)")
            elif src_layer == "core" and dst_layer == "stage":
                wrong.append(f"{path.relative_to(SRC)} (core) imports the stage imgclf.{target}")
            elif src_layer == "stage" and dst_layer == "stage" and (unit, target) not in ALLOWED:
                wrong.append(f"{path.relative_to(SRC)} (stage {unit}) imports another stage, imgclf.{target}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- the module graph: circles, back-imports

MODULES = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in SRC.rglob("*.py")}
# Exceptions to the two rules below, each removed by the change that ends it (empty since the
# download stage's engines sit beside each other: issue 21 item 3). A new circle fails.
KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_BACK_IMPORTS: set[tuple[str, str]] = set()


def _module_of(name: str) -> str | None:
    """The imgclf module a dotted name lives in: itself when it is one, else its longest module prefix."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _dynamic_targets(call: ast.Call, strings: set[str]) -> list[str]:
    """import_module("imgclf.x") -> imgclf.x; f"imgclf.{name}" -> imgclf.<s> for every string s in the file."""
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [m for m in [_module_of(arg.value)] if m and arg.value.startswith("imgclf")]
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return [f"{prefix}{s}" for s in strings if prefix.startswith("imgclf") and f"{prefix}{s}" in MODULES]
    return []


def _from_targets(module: str, node: ast.ImportFrom) -> list[tuple[str, list[str]]]:
    """`from X import a, b`: (X.a, []) for a submodule a, (X, [names]) for the names defined in X."""
    base = node.module or ""
    if node.level:  # relative: from the module's own package upward
        package = _package_of(module).split(".")
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    if not base.startswith("imgclf"):
        return []
    names = [a.name for a in node.names if f"{base}.{a.name}" not in MODULES]
    found = [(f"{base}.{a.name}", []) for a in node.names if f"{base}.{a.name}" in MODULES]
    target = _module_of(base)
    return found + ([(target, names)] if names and target else [])


def _module_imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported imgclf module, names taken from it) for every import in `module`, in functions and via importlib."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(m, []) for a in node.names if a.name.startswith("imgclf") and (m := _module_of(a.name))]
        elif isinstance(node, ast.ImportFrom):
            found += _from_targets(module, node)
        elif (isinstance(node, ast.Call) and node.args
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found += [(m, []) for m in _dynamic_targets(node, strings)]
    return [(target, names) for target, names in found if target != module]


def _circles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = set()
                while True:
                    member = stack.pop()
                    members.add(member)
                    if member == node:
                        break
                if len(members) > 1:
                    circles.append(frozenset(members))
    return circles


def _edges() -> dict[str, set[str]]:
    return {module: {target for target, _ in _module_imports(module)} for module in MODULES}


def test_the_import_graph_has_no_circle() -> None:
    edges = _edges()
    new = [c for c in _circles(edges) if c not in KNOWN_CIRCLES]
    shown = ["; ".join(f"{MODULES[a].relative_to(SRC)} -> {MODULES[b].relative_to(SRC)}"
                       for a in sorted(c) for b in sorted(edges[a] & c)) for c in new]
    assert not new, "import circles:\n" + "\n".join(shown)


def test_the_circle_check_sees_importlib_and_function_level_imports() -> None:
    """The check itself: the importlib call in imgclf.stages and api's in-function imports are edges."""
    edges = _edges()
    assert {"imgclf.train", "imgclf.download", "imgclf.audit"} <= edges["imgclf.stages"]
    assert {"imgclf.train", "imgclf.evaluate", "imgclf.export"} <= edges["imgclf.api"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_module_imports_private_names_back_from_its_package() -> None:
    """A package's work lives in its modules; one importing a _private name from its own __init__ is a back-import."""
    back = []
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        for target, names in _module_imports(module):
            back += [(module, n) for n in names if target == _package_of(module) and n.startswith("_")]
    new = sorted(set(back) - KNOWN_BACK_IMPORTS)
    assert not new, "private back-imports: " + ", ".join(f"{m} imports {n} from its package" for m, n in new)


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_train_docs_list_every_run_json_key() -> None:
    text = (DOCS / "train.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = sorted(set(RunInfo.model_fields) - documented)
    assert not missing, f"docs/train.md does not describe run.json keys {missing}"

"""The layout keeps its promises: imports go one way (cli -> stages -> core), modules stay small,
and the run directory's contract is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from imgclf.rundir import RunInfo

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"
DOCS = Path(__file__).resolve().parents[1] / "docs"
TOP = {"cli", "api", "demo", "__main__"}  # the user's entry points: they may import any stage
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
        for target in _imports(path) - {unit, "__version__"}:
            src_layer, dst_layer = _layer(unit), _layer(target)
            if dst_layer == "top" and src_layer != "top":
                wrong.append(f"{path.relative_to(SRC)} ({src_layer}) imports imgclf.{target} (top)")
            elif src_layer == "core" and dst_layer == "stage":
                wrong.append(f"{path.relative_to(SRC)} (core) imports the stage imgclf.{target}")
            elif src_layer == "stage" and dst_layer == "stage" and (unit, target) not in ALLOWED:
                wrong.append(f"{path.relative_to(SRC)} (stage {unit}) imports another stage, imgclf.{target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_train_docs_list_every_run_json_key() -> None:
    text = (DOCS / "train.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = sorted(set(RunInfo.model_fields) - documented)
    assert not missing, f"docs/train.md does not describe run.json keys {missing}"

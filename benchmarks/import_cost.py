"""Benchmark: what `import imgclf` and `imgclf --help` cost in a fresh process (issue 21: the API).

    .venv/bin/python benchmarks/import_cost.py                                 # this tree
    .venv/bin/python benchmarks/import_cost.py --baseline-src /tmp/old/src     # and another, same run

For each source tree, in alternating child processes (so a busy machine hurts both alike):
  import     wall time of `import imgclf` inside the child (best and median of --runs)
  --help     wall time of `import imgclf` plus building the CLI parser and formatting its help
  heavy      whether torch, pandas or numpy got imported by `import imgclf` (the API must not)
A baseline tree: `git archive <commit> src | tar -x -C /tmp/old`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
t = time.perf_counter()
import imgclf
imported = time.perf_counter() - t
from imgclf.cli import build_parser
build_parser().format_help()
helped = time.perf_counter() - t
print(json.dumps({"import": imported, "help": helped,
                  "heavy": sorted(m for m in ("torch", "pandas", "numpy") if m in sys.modules)}))
"""


def _once(src: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env={"PYTHONPATH": str(src)}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--baseline-src", type=Path, default=None)
    args = parser.parse_args()
    trees = {"this tree": ROOT / "src"} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    found: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, src in trees.items():
            found[name].append(_once(src))
    for name, rows in found.items():
        imp = [r["import"] * 1000 for r in rows]
        hlp = [r["help"] * 1000 for r in rows]
        print(f"{name:10} import imgclf: best {min(imp):6.1f} ms, median {statistics.median(imp):6.1f} ms;  "
              f"+ CLI help: best {min(hlp):6.1f} ms, median {statistics.median(hlp):6.1f} ms;  "
              f"heavy modules: {rows[0]['heavy'] or 'none'}")
    if args.baseline_src:
        ratio = statistics.median(r["import"] for r in found["this tree"]) / statistics.median(
            r["import"] for r in found["baseline"])
        print(f"median import time, this tree / baseline: {ratio:.2f}")


if __name__ == "__main__":
    main()

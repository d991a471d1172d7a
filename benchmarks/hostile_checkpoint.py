"""Checkpoint metadata that would size the model, timed: load_model's peak memory per file (issue 22, class 9).

    .venv/bin/python benchmarks/hostile_checkpoint.py
    .venv/bin/python benchmarks/hostile_checkpoint.py --unguarded   # + what building from the metadata costs

Each file is loaded by `imgclf.checkpoint.load_model` in a fresh child process, which prints its
peak RSS (VmHWM) and wall time; the honest checkpoint in the same run is the baseline (ratio 1.00).
`--unguarded` also builds the model that the hostile metadata describes, as load_model did before
the shapes were checked first (the 3M-name and 12288-wide cases are left out: 12 GB and 3 GB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, time
started = time.perf_counter()
outcome = "loaded"
try:
    if sys.argv[2] == "guarded":
        from imgclf.checkpoint import load_model
        load_model(sys.argv[1])
    else:  # build what the metadata asks for, without checking it against the tensors first
        from imgclf.checkpoint import describe, read_checkpoint
        from imgclf.models import create_model
        desc = describe(read_checkpoint(sys.argv[1])["imgclf"])
        create_model(desc.arch, len(desc.class_names), timm_kwargs=desc.config.model.timm_kwargs)
        outcome = "built"
except Exception as err:
    outcome = "refused: " + str(err).split(": ", 1)[-1][:70]
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(f"{peak / 1024:.0f}\\t{time.perf_counter() - started:.2f}\\t{outcome}")
"""


def _write(folder: Path, name: str, arch: str, names: list[str], timm_kwargs: dict | None = None,
           image_size: int = 32) -> Path:
    from imgclf.checkpoint import make_meta, save_slim
    from imgclf.config import load_config
    from imgclf.models import create_model

    config = load_config(None, [f"model.arch={arch}", f"data.image_size={image_size}"])
    state = {f"model.{k}": v for k, v in create_model(arch, 3).state_dict().items()}
    meta = make_meta(config, names)
    if timm_kwargs:
        meta["config"]["model"]["timm_kwargs"] = timm_kwargs
    return save_slim(folder / f"{name}.pt", state, meta)


def _run(path: Path, mode: str) -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    peak, seconds, outcome = out.split("\t")
    return float(peak), float(seconds), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unguarded", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = [
            ("honest resnet18, 3 classes", _write(folder, "honest", "resnet18", ["a", "b", "c"]), True),
            ("resnet18 tensors, 300,000 class names", _write(folder, "names300k", "resnet18",
                                                             [f"c{i}" for i in range(300_000)]), True),
            ("resnet18 tensors, 3,000,000 class names", _write(folder, "names3m", "resnet18",
                                                               [f"c{i}" for i in range(3_000_000)]), False),
            ("vit_tiny tensors, timm_kwargs.embed_dim 12288", _write(
                folder, "wide", "timm/vit_tiny_patch16_224", ["a", "b", "c"], {"embed_dim": 12288}, 224), False),
            ("vit_tiny tensors, timm_kwargs.depth 100000", _write(
                folder, "deep", "timm/vit_tiny_patch16_224", ["a", "b", "c"], {"depth": 100_000}, 224), False),
        ]
        print("file | size | load_model peak RSS (ratio to honest) | s | outcome"
              + (" | unguarded build peak RSS" if args.unguarded else ""))
        base = None
        for label, path, unguarded in cases:
            peak, seconds, outcome = _run(path, "guarded")
            base = base or peak
            line = (f"{label} | {path.stat().st_size / 2**20:.1f} MiB | {peak:.0f} MiB ({peak / base:.2f}x) | "
                    f"{seconds:.2f} | {outcome}")
            if args.unguarded and unguarded:
                upeak, _, uoutcome = _run(path, "unguarded")
                line += f" | {upeak:.0f} MiB ({upeak / base:.2f}x, {uoutcome})"
            print(line, flush=True)


if __name__ == "__main__":
    main()

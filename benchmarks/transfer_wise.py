"""Weight-space interpolation (WiSE-FT) between the two candidates a `model.keep: better` run leaves:
best.ckpt (the linear probe, when it was kept) and checkpoints/finetuned.ckpt, scored on the test split.

    PYTHONPATH=src .venv/bin/python benchmarks/transfer_wise.py OUT/run_SET ...   # run dirs of benchmarks/transfer.py

Each run directory's data is `OUT/data_SET` (as benchmarks/transfer.py lays them out). Both candidates
share BatchNorm statistics (model.bn_frozen) and start from the same probe head, so a straight line
between their weights stays one network of the same size: (1 - a) probe + a fine-tuned.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

import imgclf

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolated(probe: dict, tuned: dict, alpha: float) -> dict:
    """The probe checkpoint with its floating-point tensors moved `alpha` of the way to the fine-tuned ones."""
    out = copy.copy(probe)
    out["state_dict"] = {k: v.lerp(tuned["state_dict"][k], alpha) if v.is_floating_point() else v
                         for k, v in probe["state_dict"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    logging.getLogger("imgclf").setLevel(logging.WARNING)
    print("set," + ",".join(f"a={a}" for a in ALPHAS))
    for run in args.runs:
        name = run.name.split("_", 1)[1]
        probe = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
        tuned = torch.load(run / "checkpoints" / "finetuned.ckpt", map_location="cpu", weights_only=False)
        scores = []
        for alpha in ALPHAS:
            path = run / "checkpoints" / f"wise{int(alpha * 100)}.ckpt"
            torch.save(interpolated(probe, tuned, alpha), path)
            metrics = imgclf.evaluate(path, run.parent / f"data_{name}", split="test",
                                      out=run.parent / f"wise_{name}_{int(alpha * 100)}", progress=False)
            scores.append(f"{metrics['f1_macro']:.4f}")
        print(f"{name}," + ",".join(scores), flush=True)


if __name__ == "__main__":
    main()

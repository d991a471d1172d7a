"""imgclf: from a list of labelled image URLs to an evaluated, deployable image classifier.

The Python API (see imgclf.api and the README):

    import imgclf
    imgclf.download(["photos/"], "data")
    run = imgclf.train("data", "runs/r1", epochs=5)
    metrics = imgclf.evaluate(run)
    imgclf.load(run).predict("photo.jpg").label

Names are imported on first use, so `import imgclf` (and `imgclf --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Stage packages that are also callable (imgclf.train(...)): see imgclf._stage.
_STAGES = ("download", "train", "evaluate", "export", "audit")
_API = ("load", "Run", "Model", "Prediction")

__all__ = ["__version__", *_STAGES, *_API]


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return importlib.import_module(f"imgclf.{name}")
    if name in _API:
        return getattr(importlib.import_module("imgclf.api"), name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")

"""Callable stage packages: `imgclf.train(...)` runs `imgclf.api.train(...)` (core layer).

Why not a plain function `train` in imgclf/__init__.py: importing the package imgclf.train makes
Python set the attribute `imgclf.train` to that package, replacing the function. So the package
itself answers the call; `imgclf.train.run(...)` still reaches the stage's own entry point.
The API is looked up when called, so a stage never imports the layer above it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _StageModule(ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        api = importlib.import_module("imgclf.api")
        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def callable_stage(module_name: str) -> None:
    """Make the stage package `module_name` (imgclf.download, imgclf.train, ...) callable."""
    sys.modules[module_name].__class__ = _StageModule

"""imgclf: from a list of labelled image URLs to an evaluated, deployable image classifier.

The Python API (plain functions, defined in imgclf.api):

    import imgclf
    imgclf.download(["photos/"], "data")
    run = imgclf.train("data", "runs/r1", epochs=5)
    metrics = imgclf.evaluate(run)
    imgclf.predict(run, "photo.jpg").label

`imgclf.train` is that function, not the stage package of the same name: a stage's own
module is `from imgclf.train import run` or `from imgclf.stages import train`. The API is
imported on first use and imports each stage when called, so `import imgclf` (and
`imgclf --help`) stays fast.
"""

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING

from imgclf.version import __version__

if _TYPE_CHECKING:
    from imgclf.api import Model, Prediction, Run, audit, download, evaluate, export, load, predict, train  # noqa: F401

__all__ = ["__version__", "download", "audit", "train", "evaluate", "predict", "export", "load",
           "Run", "Model", "Prediction"]

_API_FUNCTIONS = frozenset({"download", "audit", "train", "evaluate", "predict", "export"})


def __getattr__(name: str) -> object:
    """imgclf.train, imgclf.Run, ...: the API's names, imported from imgclf.api on first use."""
    if name in __all__:
        value = getattr(_importlib.import_module("imgclf.api"), name)
        globals()[name] = value  # straight into the namespace: later lookups skip this function
        return value
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """imgclf's module type: the API functions keep their names when a stage package is imported.

    Importing the subpackage imgclf.train makes Python bind the attribute `imgclf.train` to it
    (importlib sets the child on its parent), which would hide the function `imgclf.train`
    the first time any code imports the stage. The binding is skipped for the API's names; the
    subpackage stays in sys.modules, where `from imgclf.train import run` finds it.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API_FUNCTIONS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:  # tab completion offers the API, not the modules imported so far
        return sorted(__all__)


_sys.modules[__name__].__class__ = _Package

"""The stage packages by name, for code that wants a stage's own module (top layer).

`imgclf.train` is the Python API's function (see imgclf.api), so `from imgclf import train`
gives the function, not the package it runs. The package is here:

    from imgclf.stages import train
    train.run(train.TrainOptions(config, data_dir, run_dir))    # every stage: run(options) -> result

Each name is the module itself (`imgclf.stages.train is sys.modules["imgclf.train"]`),
imported on first use, so this module costs nothing to import.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

NAMES = ("download", "audit", "train", "evaluate", "predict", "export", "serve")
__all__ = list(NAMES)

if TYPE_CHECKING:  # type checkers see the packages themselves
    import imgclf.audit as audit  # noqa: F401
    import imgclf.download as download  # noqa: F401
    import imgclf.evaluate as evaluate  # noqa: F401
    import imgclf.export as export  # noqa: F401
    import imgclf.predict as predict  # noqa: F401
    import imgclf.serve as serve  # noqa: F401
    import imgclf.train as train  # noqa: F401


def __getattr__(name: str) -> ModuleType:
    if name in NAMES:
        return importlib.import_module(f"imgclf.{name}")
    raise AttributeError(f"module 'imgclf.stages' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*NAMES, "NAMES"])

"""imgclf's version (core layer): what run.json, metrics.json, exported files and the HTTP service record.

Its own module, not imgclf/__init__.py: the package's __init__ is the Python API, which runs
the stages, so a stage importing the version from there would make an import circle.
"""

__version__ = "0.1.0"

"""Exceptions raised at the edges (bad arguments, bad config, bad files).

The CLI turns each into one line on stderr and a non-zero exit code; nothing
inside the stages prints tracebacks for user mistakes.
"""


class ImgclfError(Exception):
    """A user-facing error: the message is one line that names the file, row or key."""

    exit_code = 1


class ConfigError(ImgclfError):
    """A config file or override is invalid (unknown key, bad value)."""

    exit_code = 2


class DataError(ImgclfError):
    """An input file or data directory is unusable."""

    exit_code = 2


def first_line(err: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """`Type: first line of the message`, cut to `limit` characters: an exception as one log line.

    Library errors often span many lines (load_state_dict lists every key, Lightning prints
    advice); the CLI shows one line, and an error built from user data must stay bounded.
    with_type=False leaves the type name out where the message says enough (the type name
    stands in when the message is empty).
    """
    text = " ".join(str(err).strip().splitlines()[:1]).strip()
    name = err.__class__.__name__
    line = (f"{name}: {text}" if with_type else text) if text else name
    return line if len(line) <= limit else line[: limit - 3] + "..."


class MissingExtra(ImgclfError):
    """An optional package is not installed; the message names the extra that brings it."""

    exit_code = 2


# Import name of an optional package -> (the extra that installs it, what needs it).
EXTRAS = {
    "fastapi": ("serve", "serve"), "uvicorn": ("serve", "serve"), "fastapi_offline": ("serve", "serve"),
    "multipart": ("serve", "serve"), "python_multipart": ("serve", "serve"),
    "prometheus_client": ("serve", "serve"),
    "onnx": ("export", "ONNX export"), "onnxruntime": ("export", "an ONNX model"),
    "onnxscript": ("export", "ONNX export"),
    "timm": ("timm", "a timm/<name> model"), "mlflow": ("track", "trainer.logger: mlflow"),
    "cleanlab": ("audit", "audit"), "imagehash": ("audit", "audit"), "faiss": ("audit", "audit"),
    "s3fs": ("s3", "object storage (s3://)"), "ray": ("ray", "--engine ray"),
}


def missing_extra(err: ImportError) -> MissingExtra | None:
    """The one-line error for an ImportError of an optional package, or None for any other import."""
    top = (getattr(err, "name", None) or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra, needed_by = EXTRAS[top]
    return MissingExtra(f"{needed_by} needs {top}, which is not installed: pip install 'imgclf[{extra}]'")


def require(*modules: str) -> None:
    """Import optional packages up front: a missing one is the one-line MissingExtra before any work."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise (missing_extra(err) or err) from None

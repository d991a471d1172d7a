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

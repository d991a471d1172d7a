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

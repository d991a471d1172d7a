"""Write-to-temp-then-rename: the one way imgclf replaces a file (core layer).

A process killed mid-write (SIGKILL, a full disk) leaves the previous file intact, never a
half-written one: the content goes to a temporary name in the same folder, and only a complete
file is renamed over the target (`os.replace` is atomic on POSIX within one filesystem).
`write_all`: the loop that writes all of a buffer to a file descriptor.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    For writers that need a file name (parquet, savefig, torch.save, exporters). The temporary
    name keeps the suffix, so writers that pick a format from it still see the right one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str, encoding: str = "utf-8", errors: str = "strict") -> Path:
    """Replace `path` with `data` (text is encoded with `encoding` and the `errors` handler)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode(encoding, errors) if isinstance(data, str) else data)
    return path


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to a file descriptor (os.write may write less than asked: a pipe, a signal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

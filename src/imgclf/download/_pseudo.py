"""Paths that are never read: anything whose resolution passes through /proc, /dev or /sys.

Checked link by link, because a resolved path alone misses it (/dev/fd/3 resolves to whatever this
process holds as file descriptor 3, such as its own download state).
"""

from __future__ import annotations

import functools
import os

PSEUDO_ROOTS = ("/proc", "/dev", "/sys")


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def is_pseudo(path: str) -> bool:
    return any(under(path, pseudo) for pseudo in PSEUDO_ROOTS)


@functools.lru_cache(maxsize=4096)
def _folder_passes_pseudo(folder: str) -> bool:
    return passes_pseudo(folder, last=False)


def passes_pseudo(path: str, last: bool = True, hops: int = 40) -> bool:
    """True when resolving `path` passes through /proc, /dev or /sys, hop by hop: realpath alone
    misses it (/dev/fd/3 resolves to whatever file descriptor 3 is, this process's own state)."""
    path = os.path.abspath(path)
    if last:  # the folders are resolved once each (cached); the name itself here
        parent, name = os.path.split(path)
        if parent != path and _folder_passes_pseudo(parent):
            return True
        parts, current = [name], parent
    else:
        parts, current = path.split(os.sep)[1:], os.sep
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        step = os.path.join(current, part)
        if is_pseudo(step):
            return True
        try:
            target = os.readlink(step)
        except OSError:  # not a link (or not there): go on lexically
            current = step
            continue
        hops -= 1
        if hops < 0:
            return False  # a link loop: opening it fails anyway
        parts = [*target.split(os.sep), *parts]
        if target.startswith(os.sep):
            current = os.sep
    return is_pseudo(current)


def forget() -> None:
    """Drop the cached folder answers (links may have changed since an earlier run in this process)."""
    _folder_passes_pseudo.cache_clear()

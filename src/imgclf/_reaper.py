"""Kills a private Ray cluster's processes once the download that started it is gone.

Run as a script (stdlib only, so it starts in milliseconds and holds ~10 MB): reads lines
"pid start_time" on stdin; when stdin closes (the download finished, or died, even by SIGKILL),
it SIGKILLs each listed process that still runs with the same start time (not a reused pid),
and everything below them (Ray's workers, started later by its raylet). Linux only (/proc);
elsewhere it does nothing and ray.shutdown() alone cleans up.
"""

from __future__ import annotations

import os
import signal
import sys


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def reap(listed: list[tuple[int, str]]) -> list[int]:
    """SIGKILL the listed processes still alive (same start time) and all their descendants."""
    alive = [pid for pid, started in listed if start_time(pid) == started]
    targets = list(dict.fromkeys(alive + [d for pid in alive for d in descendants(pid)]))
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return targets


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the download; it closes our stdin
    listed = []
    for line in sys.stdin:
        pid, started = line.split()
        listed.append((int(pid), started))
    reap(listed)


if __name__ == "__main__":
    main()

"""Progress that reads well in a terminal and in a log (core layer).

In a terminal (stderr is a TTY) long loops show a live bar. Anywhere else (CI, `| tee`, a
file, Docker logs) bars would write thousands of carriage-return frames; there, progress is
a plain line at most every `LOG_EVERY_S` seconds and one at the end, so a piped run stays
small and every line is readable.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LOG_EVERY_S = 15.0
log = logging.getLogger("imgclf")


def interactive() -> bool:
    """True when live bars make sense: stderr is a terminal and IMGCLF_NO_BARS is not set."""
    if os.environ.get("IMGCLF_NO_BARS"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LineProgress:
    """The log-friendly progress: `label: 4,000/10,000 unit (40%), 812 unit/s, 7s left`, throttled."""

    def __init__(self, label: str, total: int | None, unit: str, every_s: float = LOG_EVERY_S) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done = 0
        self.started = self._last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            return (f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:,.1f} {self.unit}/s, {_eta(left)} left")
        return f"{self.label}: {self.done:,} {self.unit}, {rate:,.1f} {self.unit}/s"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.info(self.line())

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        log.info(f"{self.label}: {self.done:,} {self.unit} in {_eta(elapsed)} "
                 f"({self.done / max(elapsed, 1e-9):,.1f} {self.unit}/s)")


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "images",
          enabled: bool = True, size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate `items` with a bar in a terminal, throttled lines in a log, or silently when disabled.

    `size(item)` counts what one item holds (a batch of images); by default each item counts 1.
    """
    if not enabled:
        yield from items
        return
    measure = size or (lambda _item: 1)
    if interactive():
        from tqdm import tqdm

        with tqdm(total=total, desc=label, unit=unit.rstrip("s") or unit, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update(measure(item))
        return
    lines = LineProgress(label, total, unit)
    for item in items:
        yield item
        lines.advance(measure(item))
    lines.close()

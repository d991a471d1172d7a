"""Download progress on stderr: URLs done, rate, ok and failed; a no-op when disabled.

A live rich bar in a terminal; elsewhere (CI, a file) a plain line every few seconds
(imgclf.progress.LineProgress), since a bar's redraws would flood a log.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from imgclf.progress import LineProgress, interactive


class Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.ok, self.failed = total, 0, 0
        self._started = time.monotonic()
        self._bar: RichProgress | None = None
        self._lines: LineProgress | None = None
        if enabled and not interactive():
            self._lines = LineProgress("download", total, "rows")
        elif enabled:
            self._bar = RichProgress(
                TextColumn("download"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7.1f} URL/s"),
                TextColumn("[green]ok {task.fields[ok]}[/]"),
                TextColumn("[red]failed {task.fields[failed]}[/]"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), refresh_per_second=4)
            self._task = self._bar.add_task("download", total=total, rate=0.0, ok=0, failed=0)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self.tick()
            self._bar.stop()
        if self._lines is not None:
            self._lines.close()

    def advance(self, status: str) -> None:
        if status == "ok":
            self.ok += 1
        else:
            self.failed += 1
        if self._lines is not None:
            self._lines.advance()
        if self._bar is not None:
            self._bar.advance(self._task)

    def tick(self) -> None:
        if self._bar is not None:
            rate = (self.ok + self.failed) / max(1e-9, time.monotonic() - self._started)
            self._bar.update(self._task, rate=rate, ok=self.ok, failed=self.failed)

"""The download stage's result (returned by download.run and download.merge)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DownloadResult:
    total: int  # input rows
    counts: dict[str, int]  # status -> rows
    manifest_path: Path
    report_path: Path
    report: dict[str, Any]
    fetched: int  # URLs finished by this run
    elapsed_s: float

    def summary(self) -> str:
        """The end-of-run table `imgclf download` prints (one line per status, then duplicates and leakage), as
        plain text. The stage prints it itself when `print_summary` is on (the CLI's default): in colour on a
        terminal, and also when Ctrl-C ends the run, when there is no result to return."""
        import io

        from rich.console import Console

        from imgclf.download._report import print_summary

        buffer = io.StringIO()
        print_summary(self.report, Console(file=buffer, no_color=True, highlight=False))
        return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())  # no padding

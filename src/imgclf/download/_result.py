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

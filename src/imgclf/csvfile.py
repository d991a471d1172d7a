"""The one way imgclf writes CSV (core): every text cell spreadsheet-safe, whoever writes it.

A spreadsheet runs a cell that starts with =, +, -, @, TAB, CR or LF as a formula, so a label or
URL such as `=HYPERLINK("http://...")` taken from scraped data must not reach one raw
(`imgclf.untrusted.csv_cell` says how a cell is neutralised and undone). Every CSV imgclf writes
(predict's output, evaluate's predictions.csv and classification_report.csv, split.csv,
metrics.csv, audit.csv, the demo's source lists) goes through this module:

    write_frame(frame, path, **to_csv_kwargs)     a DataFrame to a file
    frame_text(frame, **to_csv_kwargs) -> str     a DataFrame as CSV text (for an atomic write)
    RowWriter(stream).writerow(cells)             rows as they come (streamed output)

tests/test_csvfile.py walks the package's source and fails on any other `csv.writer`,
`DictWriter` or `.to_csv` call, so a new CSV output cannot forget the rule. Readers of CSVs
imgclf wrote undo it on their text columns with `untrusted.csv_raw_frame`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from imgclf.untrusted import csv_cell, csv_safe_frame

if TYPE_CHECKING:  # pandas is imported by callers that have frames: predict's rows must not load it
    import pandas as pd


def write_frame(frame: pd.DataFrame, path: str | Path | IO[str], **kwargs: Any) -> None:
    """`frame.to_csv(path, **kwargs)` with every text cell (and a text index) through `csv_cell`."""
    csv_safe_frame(frame).to_csv(path, **kwargs)


def frame_text(frame: pd.DataFrame, **kwargs: Any) -> str:
    """The CSV text `write_frame` would write."""
    return csv_safe_frame(frame).to_csv(None, **kwargs)


class RowWriter:
    """`csv.writer(stream)` whose every cell goes through `csv_cell` (numbers are left as they are)."""

    def __init__(self, stream: IO[str], **kwargs: Any) -> None:
        self._writer = csv.writer(stream, **kwargs)

    def writerow(self, cells: Iterable[Any]) -> None:
        self._writer.writerow([csv_cell(cell) for cell in cells])

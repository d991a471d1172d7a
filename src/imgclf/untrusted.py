"""Text from users' data (labels, file names, table cells) stays data: the rules, in one place (core).

Labels. A label may not hold a control character (Unicode category Cc: U+0000-U+001F, U+007F-U+009F).
A NUL is cut by C code, a newline splits a log line, an escape sequence drives the terminal that
prints it. Where a label enters imgclf (a table row, a class folder, a manifest read by train or
evaluate) such a label is refused with one line naming where it came from (`check_label`,
`check_labels`); a label is never cut or rewritten.

CSV cells. A spreadsheet evaluates a cell whose first character is =, +, -, @, TAB, CR or LF as a
formula (OWASP "CSV injection"). Every CSV imgclf writes passes its text cells through `csv_cell`,
which prefixes such a cell with one apostrophe, and also a cell that already starts with one, so
`csv_uncell` (strip one leading apostrophe) gives back the raw text exactly. Numbers are not text
cells and are never touched. JSON outputs (metrics.json, predict's JSONL, serve) keep raw values.

Log fields. Text a request chose (a path, a query, a method, a forwarded address) goes into a
log line through `log_field`: every character that is not printable (C0/C1 controls such as CR,
LF and ESC, Unicode line separators, bidirectional overrides) and the backslash and double
quote that delimit fields become \\xHH / \\uHHHH escapes, so one request is one line, a log
reader's terminal is never driven, and the escaping can be undone without ambiguity.

Table headers. `check_table_header` reads a CSV's header and first row with the csv module before
pandas does: a column named twice (after trimming and lower-casing) and a first row with more
fields than the header (pandas would silently take the first column as an index and shift every
value: the URL is lost) are one-line errors naming the file and line. Later rows with more fields
than the header are refused by pandas itself, with their line number.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgclf.errors import DataError

if TYPE_CHECKING:  # pandas is imported where frames are handled: predict's CSV cells must not load it
    import pandas as pd

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FORMULA_START = frozenset("=+-@\t\r\n")
_SHOWN = 60  # characters of a bad value shown in an error line


def shown(value: str, limit: int = _SHOWN) -> str:
    """`value` for an error line: repr (control characters visible), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a class name, or None when it can."""
    found = _CONTROL.search(label)
    if found is None:
        return None
    return f"holds a control character (U+{ord(found.group()):04X})"


def _refusal(where: str, label: str, problem: str) -> DataError:
    return DataError(f"{where}: label {shown(label)} {problem}; labels are data, and control characters "
                     "are refused rather than cut: remove them from the source")


def check_label(label: str, where: str) -> None:
    """Raise a one-line DataError naming `where` when `label` holds a control character."""
    problem = label_problem(label)
    if problem is not None:
        raise _refusal(where, label, problem)


def check_labels(labels: pd.Series, where: Callable[[int], str]) -> None:
    """Vectorised `check_label` over a column; `where(i)` names the i-th value (positional)."""
    bad = labels.astype(str).str.contains(_CONTROL, regex=True).to_numpy().nonzero()[0]
    if len(bad):
        i = int(bad[0])
        label = str(labels.iloc[i])
        raise _refusal(where(i), label, label_problem(label) or "")


def log_field(value: str, limit: int = 200) -> str:
    """`value` escaped for a one-line log record, cut to `limit` characters before escaping."""
    cut = value[:limit]
    if cut.isprintable() and "\\" not in cut and '"' not in cut:
        return cut + ("..." if len(value) > limit else "")
    out = [ch if ch.isprintable() and ch not in '\\"' else
           (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
            else f"\\U{ord(ch):08x}") for ch in cut]
    return "".join(out) + ("..." if len(value) > limit else "")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: one apostrophe before a formula-like start."""
    if isinstance(value, str) and value and (value[0] in FORMULA_START or value[0] == "'"):
        return "'" + value
    return value


def csv_uncell(value: Any) -> Any:
    """The raw text of a cell written by `csv_cell`."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value


def csv_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells (and text index) went through `csv_cell`."""
    from pandas.api.types import is_string_dtype

    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or is_string_dtype(out[column].dtype):
            out[column] = out[column].map(csv_cell)
    if out.index.dtype == object or is_string_dtype(out.index.dtype):  # pandas 3 infers str for text
        out.index = out.index.map(csv_cell)
    return out


def csv_raw_frame(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Undo `csv_safe_frame` on the named text columns of a CSV read back by imgclf."""
    out = frame.copy()
    for column in columns:
        if column in out:
            out[column] = out[column].map(csv_uncell)
    return out


def check_table_header(path: Path, sep: str, used: Iterable[str] | None = None) -> list[str]:
    """The header's column names (trimmed, lower-cased); a one-line DataError for a column named
    twice (among `used`, or any non-empty name when None) or a first row longer than the header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=sep)
            header = next(reader, None)
            if header is None:
                return []
            names = [c.strip().lower() for c in header]
            wanted = set(used) if used is not None else {n for n in names if n}
            seen: dict[str, str] = {}
            for raw, name in zip(header, names, strict=True):
                if name in wanted and name in seen:
                    raise DataError(f"{path}: line 1: column {shown(name)} appears twice "
                                    f"({shown(seen[name])} and {shown(raw)}); rename one")
                seen.setdefault(name, raw)
            row = next((r for r in reader if r), None)
            if row is not None and len(row) > len(header):
                raise DataError(f"{path}: line {reader.line_num}: {len(row)} fields but the header has "
                                f"{len(header)}; quote values that hold '{sep}'")
            return names
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse ({str(err)[:120]})") from None

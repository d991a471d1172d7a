"""One image's classification, and the one shape of a failure (core layer).

A failure is a status word and a message everywhere: the download manifest has `status`
(`not_image`, `too_large`, `timeout`, ... from `imgclf.manifest.STATUSES`) and `error`; predict's
rows (CSV, JSONL, the Python API's `Prediction`) have the same two fields with the same words;
serve answers `{"error": <status word>, "detail": <message>}`. Inside predict a failure travels as
one string `"<status>: <message>"` (the readers and decoders return that as a value); `Prediction`
splits it. A reason without a status word (an unexpected exception) has status `error`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["Prediction", "failure", "split_failure"]

_STATUS = re.compile(r"([a-z][a-z0-9_]*): (.*)", re.DOTALL)


def failure(status: str, message: str) -> str:
    """The value a reader returns for an input it cannot use: `"<status>: <message>"`."""
    return f"{status}: {message}"


def split_failure(text: str) -> tuple[str, str]:
    """`"not_image: html document"` -> ("not_image", "html document"); no status word -> ("error", text)."""
    match = _STATUS.fullmatch(text)
    return (match.group(1), match.group(2)) if match else ("error", text)


@dataclass(frozen=True)
class Prediction:
    """The classification of one input: `label`, its `probability`, and the `top` (label, probability) list;
    for a multi-label model also `labels`, the (label, probability) pairs above their thresholds.

    An input that could not be used has `label` None, `status` saying why in one word (the download
    manifest's words: `not_image`, `too_large`, `timeout`, `unreadable`, ...) and `error` the message.
    """

    input: str
    top: list[tuple[str, float]]
    failed: str = ""  # "" or "<status>: <message>", as the readers return it
    columns: tuple[tuple[str, str], ...] = ()  # the input table row's other cells, passed through to the output
    # A multi-label model's answer: every (label, probability) at or above its label's threshold, highest
    # first (possibly none); None for a single-label model, whose answer is `label`.
    labels: list[tuple[str, float]] | None = None

    @functools.cached_property
    def _outcome(self) -> tuple[str, str]:  # parsed once: writers read both fields of every row
        return split_failure(self.failed) if self.failed else ("ok", "")

    @property
    def status(self) -> str:
        return self._outcome[0]

    @property
    def error(self) -> str:
        return self._outcome[1]

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> float | None:
        return self.top[0][1] if self.top else None

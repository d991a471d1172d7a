"""A stage result that also reads as the dict it replaced (audit, evaluate: their JSON file's content).

`imgclf.evaluate(run)["f1_macro"]`, `result.get("judge")`, `dict(result)` and `result == json.load(f)`
keep working for code written when run() returned the dict itself; the result adds typed fields
(the paths written) and `summary()`. Read-only, like the frozen dataclass it is mixed into.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class ReadsAsDict(Mapping[str, Any]):
    """Mixin for a frozen dataclass (declare it with eq=False, so Mapping's == against a dict is kept)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        """The dict itself (the content of the JSON file written), for json.dumps and code that mutates it."""
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

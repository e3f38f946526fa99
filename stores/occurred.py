"""When a memory's fact happened, as the vector store keeps it: ``occurred_at`` (ISO-8601 UTC) and
`OCCURRED_TS` (the same moment in epoch seconds, a float with a payload index on every backend), and a
search's `TimeRange` over it (one ``Range`` condition in the backend's query; `stores.vectors.select`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from memq.errors import StoreError
from memq.filters import Logic, Match, Node

__all__ = ["OCCURRED_TS", "TimeRange", "stored_moment"]

OCCURRED_TS = "occurred_ts"
"""Payload field of ``occurred_at`` in epoch seconds (float index on every backend): what ranges filter."""


@dataclass(frozen=True)
class TimeRange:
    """A search's time range on ``occurred_at``: `after` inclusive, `before` exclusive (aware datetimes;
    None: unbounded on that side). A memory without ``occurred_at`` is outside every range.

    Raises:
        StoreError: (on construction) naive bounds, or `after` not earlier than `before`.
    """

    after: datetime | None = None
    before: datetime | None = None

    def __post_init__(self) -> None:
        if any(b is not None and b.tzinfo is None for b in (self.after, self.before)):
            raise StoreError("a time range's bounds must be aware datetimes")
        if self.after is not None and self.before is not None and self.after >= self.before:
            raise StoreError("a time range's after must be earlier than its before")

    def node(self) -> Node | None:
        """The range as a filter tree on `OCCURRED_TS` (``gte`` after, ``lt`` before); None when unbounded."""
        parts: list[Node] = []
        if self.after is not None:
            parts.append(Match(OCCURRED_TS, "gte", self.after.timestamp()))
        if self.before is not None:
            parts.append(Match(OCCURRED_TS, "lt", self.before.timestamp()))
        return Logic("and", tuple(parts)) if parts else None

    def as_json(self) -> list[str | None]:
        """``[after, before]`` as ISO-8601 strings (or None), for `from_json`."""
        return [b.isoformat() if b is not None else None for b in (self.after, self.before)]

    @classmethod
    def from_json(cls, raw: object) -> TimeRange | None:
        """The range `as_json` wrote (None for None)."""
        if not isinstance(raw, list) or len(raw) != 2:
            return None
        after, before = (datetime.fromisoformat(b) if isinstance(b, str) else None for b in raw)
        return cls(after, before)


def stored_moment(value: object) -> datetime | None:
    """A stored ``occurred_at`` as a datetime, None when absent or not ISO-8601 (never raises)."""
    if not isinstance(value, str):
        return None
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        return None
    return found if found.tzinfo is not None else found.replace(tzinfo=timezone.utc)

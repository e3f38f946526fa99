"""Checks on what callers send, shared by the producer (adds) and the read helpers (search, get_all).

Each check raises a named `InvalidRequest` subclass with ``.field`` set, before anything is enqueued or
queried. A leaf module: it imports only `memq.errors`, `memq.models` and `memq.config`.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta, timezone

from memq.config import LimitsSettings
from memq.errors import InvalidRequest, InvalidSearch, InvalidTimeRange, InvalidTimestamp

RESERVED_KEYS = frozenset(
    {"data", "hash", "created_at", "updated_at", "user_id", "agent_id", "run_id", "actor_id", "role",
     "source_message_ids", "job_id", "memory", "occurred_at", "occurred_ts"}
)
"""Payload keys memq writes itself: metadata may not shadow them."""

SCOPE_KEYS = ("user_id", "agent_id", "run_id")

MAX_RESULTS = 1000
"""Largest `limit` of a search or get_all."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Integers the stores hold (Qdrant payload and filter values are signed 64-bit)."""

EARLIEST_TIMESTAMP = datetime(2, 1, 1, tzinfo=timezone.utc)
LATEST_TIMESTAMP = datetime(9998, 12, 31, 23, 59, 59, 999_999, tzinfo=timezone.utc)
"""The range of timestamps memq accepts (UTC). The pipeline moves a timestamp to UTC (up to a day) and
computes dates up to a month before it ("last month"); Python's datetime stops at years 1 and 9999, so
``0001-01-15`` or ``9999-12-31T23:59-05:00`` overflow in the worker. A year of margin on each side."""

_EARLIEST_EPOCH_S = EARLIEST_TIMESTAMP.timestamp()
_LATEST_EPOCH_S = LATEST_TIMESTAMP.timestamp()


def _short(value: object, chars: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def check_text(value: str, field: str, error: type[InvalidRequest], *, what: str | None = None) -> None:
    """Refuse a string that cannot be stored: it must encode as UTF-8 and hold no U+0000.

    Requests are stored as JSON in Redis and rows in SQL: a lone surrogate (``"\\ud800"``) has no UTF-8
    encoding, and PostgreSQL text columns cannot hold U+0000.

    Args:
        value: the string.
        field: the request field, set as the error's ``.field``.
        error: the `InvalidRequest` subclass to raise.
        what: how the message names the string (defaults to `field`).

    Raises:
        error: the string holds a lone surrogate or U+0000.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what or field} holds a lone surrogate at position {exc.start}; text must be valid "
                    "Unicode (encodable as UTF-8)", field=field) from exc
    if "\x00" in value:
        raise error(f"{what or field} holds U+0000 (NUL) at position {value.index(chr(0))}", field=field)


def check_json(value: object, field: str, error: type[InvalidRequest], *, max_depth: int) -> None:
    """Refuse a value that is not plain JSON the stores can hold, without recursion.

    JSON here is: dicts with string keys, lists (or tuples), strings (valid text), booleans, None,
    integers in the signed 64-bit range and finite floats.

    Args:
        value: the value to check (usually a dict).
        field: the request field, set as the error's ``.field``.
        error: the `InvalidRequest` subclass to raise.
        max_depth: most levels of nested dicts and lists (``{"a": 1}`` is 1, ``{"a": [1]}`` is 2).

    Raises:
        error: a key that is not a string, a value of another type, a non-finite float, an integer out of
            range, invalid text, or nesting deeper than `max_depth`.
    """
    stack: list[tuple[object, str, int]] = [(value, field, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                raise error(f"{field} is nested deeper than {max_depth} levels", field=field)
            for key, child in item.items():
                if not isinstance(key, str):
                    raise error(f"{where} has a key of type {type(key).__name__} ({_short(key)}); keys must be "
                                "strings", field=field)
                check_text(key, field, error, what=f"a key of {where}")
                stack.append((child, f"{where}[{_short(key, 24)}]", depth + 1))
        elif isinstance(item, (list, tuple)):
            if depth >= max_depth:
                raise error(f"{field} is nested deeper than {max_depth} levels", field=field)
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_text(item, field, error, what=where)
        elif item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise error(f"{where} is an integer outside the signed 64-bit range", field=field)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise error(f"{where} is {item}; JSON numbers must be finite", field=field)
        else:
            raise error(f"{where} is a {type(item).__name__}, not a JSON value (dict, list, str, int, float, "
                        "bool or None)", field=field)


def check_timestamp(value: object) -> datetime | None:
    """A request's timestamp as an aware datetime, or None.

    Args:
        value: None; a `datetime` (naive means UTC); an ISO-8601 string; or epoch seconds (int or float,
            not bool). It must lie between `EARLIEST_TIMESTAMP` and `LATEST_TIMESTAMP`.

    Returns:
        The datetime in its own UTC offset, or in UTC when that offset is not whole minutes (JSON, as
        pydantic writes it, keeps whole minutes only); None when `value` is None.

    Raises:
        InvalidTimestamp: another type, an unparsable string, a non-finite number, or out of range.
    """
    if value is None:
        return None
    span = f"between {EARLIEST_TIMESTAMP.isoformat()} and {LATEST_TIMESTAMP.isoformat()}"
    if isinstance(value, bool):
        raise InvalidTimestamp("timestamp must be a datetime, an ISO-8601 string or epoch seconds, not a bool",
                               field="timestamp")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidTimestamp(f"timestamp must be finite epoch seconds, got {value}", field="timestamp")
        if not _EARLIEST_EPOCH_S <= value <= _LATEST_EPOCH_S:
            raise InvalidTimestamp(f"timestamp {_short(value)} epoch seconds is not {span} (milliseconds "
                                   "instead of seconds?)", field="timestamp")
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidTimestamp(f"timestamp {_short(value)} is not ISO-8601", field="timestamp") from exc
    if not isinstance(value, datetime):
        raise InvalidTimestamp(f"timestamp must be a datetime, an ISO-8601 string or epoch seconds, got "
                               f"{type(value).__name__}", field="timestamp")
    try:
        offset = value.utcoffset()
        aware = value if offset is not None else value.replace(tzinfo=timezone.utc)
        utc = aware.astimezone(timezone.utc)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidTimestamp(f"timestamp {_short(value)} cannot be converted to UTC: {exc}",
                               field="timestamp") from exc
    if not EARLIEST_TIMESTAMP <= utc <= LATEST_TIMESTAMP:
        raise InvalidTimestamp(f"timestamp {utc.isoformat()} (UTC) is not {span}", field="timestamp")
    if offset is not None and offset % timedelta(minutes=1):
        return utc
    return aware


def check_time_range(after: object, before: object) -> tuple[datetime | None, datetime | None]:
    """A search's time range on ``occurred_at``: `after` inclusive, `before` exclusive.

    Args:
        after, before: None (unbounded); a `date` (midnight UTC of that day); a `datetime` (naive means
            UTC); or an ISO-8601 string of either. ``after=date(2023, 5, 7), before=date(2023, 5, 8)``
            is the whole of 7 May 2023 (UTC).

    Returns:
        ``(after, before)`` as aware UTC datetimes (None where unbounded).

    Raises:
        InvalidTimeRange: a bound that is not a date or datetime, outside `EARLIEST_TIMESTAMP` ..
            `LATEST_TIMESTAMP`, or `after` not earlier than `before` (an empty range).
    """
    bounds: list[datetime | None] = []
    for name, value in (("after", after), ("before", before)):
        if isinstance(value, str) and len(value.strip()) == 10:
            try:
                value = date.fromisoformat(value.strip())
            except ValueError:
                pass
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime.combine(value, time(), tzinfo=timezone.utc)
        if isinstance(value, (int, float)):
            raise InvalidTimeRange(f"{name} must be a date, a datetime or an ISO-8601 string, not a number",
                                   field=name)
        try:
            moment = check_timestamp(value)
        except InvalidTimestamp as exc:
            raise InvalidTimeRange(str(exc).replace("timestamp", name, 1), field=name) from exc
        bounds.append(moment.astimezone(timezone.utc) if moment is not None else None)
    start, end = bounds
    if start is not None and end is not None and start >= end:
        raise InvalidTimeRange(f"after ({start.isoformat()}) must be earlier than before ({end.isoformat()})",
                               field="after")
    return start, end


def check_query(query: object, max_chars: int) -> str:
    """A search query: a non-blank string of at most `max_chars` characters, valid text.

    Raises:
        InvalidSearch: not a string, blank, too long, or invalid text.
    """
    if not isinstance(query, str):
        raise InvalidSearch(f"query must be a string, got {type(query).__name__}", field="query")
    if not query.strip():
        raise InvalidSearch("query must be a non-empty string", field="query")
    if len(query) > max_chars:
        raise InvalidSearch(f"query is {len(query)} characters; the limit is {max_chars}", field="query")
    check_text(query, "query", InvalidSearch)
    return query


def check_limit(limit: object) -> int:
    """A result count: an int (not a bool) in 1..`MAX_RESULTS`.

    Raises:
        InvalidSearch: another type, or out of range.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidSearch(f"limit must be an int, got {type(limit).__name__} {_short(limit)}", field="limit")
    if not 1 <= limit <= MAX_RESULTS:
        raise InvalidSearch(f"limit must be between 1 and {MAX_RESULTS}, got {limit}", field="limit")
    return limit


def check_threshold(threshold: object) -> float | None:
    """A minimum cosine similarity: None, or an int or float (not a bool) in -1..1.

    Raises:
        InvalidSearch: another type, not finite, or out of range.
    """
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise InvalidSearch(f"threshold must be a number between -1 and 1, got {type(threshold).__name__} "
                            f"{_short(threshold)}", field="threshold")
    if not -1.0 <= threshold <= 1.0:  # NaN fails this too
        raise InvalidSearch(f"threshold must be between -1 and 1 (cosine similarity), got {threshold}",
                            field="threshold")
    return float(threshold)


def check_search_args(query: object, *, limit: object, threshold: object, limits: LimitsSettings) -> None:
    """Check the arguments of `memories.Memories.search` other than the scope.

    Raises:
        InvalidSearch: a bad query, limit or threshold.
    """
    check_query(query, limits.max_query_chars)
    check_limit(limit)
    check_threshold(threshold)


def check_list_args(*, limit: object) -> None:
    """Check the arguments of `memories.Memories.get_all` other than the scope.

    Raises:
        InvalidSearch: a bad limit.
    """
    check_limit(limit)

"""Search and get_all filters: Mem0's filter language, parsed once into a small tree every vector backend
translates (`stores.edge.edge_filter`, `stores.qdrant.qdrant_filter`), with the reference semantics in
`evaluate`.

The language (Mem0 1.0's enhanced metadata filters; the grammar is Mem0's, the code memq's own)::

    {"topic": "food"}                                 equality (a list field matches if any element equals)
    {"topic": ["food", "travel"]}                     any of (memq's earlier shorthand for "in")
    {"topic": "*"}                                    the field exists and is not null or []
    {"n": {"gte": 2, "lt": 5}}                        operators on one field, all must hold:
        eq, ne, in, nin, gt, gte, lt, lte, contains, icontains
    {"created_at": {"gte": "2024-05-01T00:00:00Z"}}   ranges on dates (ISO-8601 strings or datetimes)
    {"AND": [f1, f2]}, {"OR": [f1, f2]}, {"NOT": [f1, f2]}   all / any / none of the sub-filters

Several keys in one dict must all hold. Keys are payload fields: metadata keys, ``actor_id``, ``role``,
``created_at``, ``updated_at``, the scope ids, and ``data`` (the memory text, for ``contains``). A filter
only ever narrows: stores AND it with the caller's scope, so ``{"user_id": "*"}`` or an ``OR`` naming
another user never reaches beyond the scope. ``ne`` and ``nin`` also match memories without the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from memq.checks import check_text
from memq.errors import InvalidFilter

__all__ = ["OPERATORS", "Logic", "Match", "Node", "evaluate", "has_op", "parse_filters", "relax"]

OPERATORS = frozenset({"eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains", "icontains"})
RANGES = ("gt", "gte", "lt", "lte")
MAX_DEPTH = 8
MAX_CONDITIONS = 100
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 4_096
MAX_LIST = 1_000

Scalar = str | int | float | bool

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")
UNFILTERABLE = frozenset({"job_id"})
DATE_KEYS = frozenset({"created_at", "updated_at"})


@dataclass(frozen=True)
class Match:
    """One condition on a payload field.

    Attributes:
        key: the payload field.
        op: an operator of `OPERATORS`, or ``exists`` (``"*"``).
        value: the operand: a scalar, a tuple of scalars (``in``/``nin``), a number or an aware
            datetime (ranges), a string (``contains``/``icontains``), None (``exists``).
    """

    key: str
    op: str
    value: Any = None


@dataclass(frozen=True)
class Logic:
    """``and``: every part holds; ``or``: at least one does; ``not``: none does."""

    kind: Literal["and", "or", "not"]
    parts: tuple[Node, ...]


Node = Match | Logic


def parse_filters(filters: object) -> Node | None:
    """Parse Mem0-style filters (module docstring) into a tree.

    Args:
        filters: a dict, or None.

    Returns:
        The tree (an ``and`` of the dict's keys), or None for None or ``{}``.

    Raises:
        InvalidFilter: not a dict of string keys; an unknown operator or logical key; an operand of the
            wrong type (a range on a string that is not a date, ``in`` without a list, mixed types);
            more than `MAX_CONDITIONS` conditions or `MAX_DEPTH` levels.
    """
    if filters is None:
        return None
    counter = [0]
    node = _parse(filters, 0, counter)
    return node if node.parts else None


def _parse(filters: object, depth: int, counter: list[int]) -> Logic:
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"filters nest deeper than {MAX_DEPTH} levels", field="filters")
    if not isinstance(filters, Mapping):
        raise InvalidFilter(f"filters must be a dict such as {{'topic': 'food'}}, got {type(filters).__name__}",
                            field="filters")
    parts: list[Node] = []
    for key, value in filters.items():
        if key in ("AND", "OR", "NOT"):
            subs = [value] if key == "NOT" and isinstance(value, Mapping) else value
            if not isinstance(subs, list) or not subs:
                raise InvalidFilter(f"{key} takes a non-empty list of filter dicts", field="filters")
            kind: Literal["and", "or", "not"] = "and" if key == "AND" else "or" if key == "OR" else "not"
            parts.append(Logic(kind, tuple(_parse(s, depth + 1, counter) for s in subs)))
        else:
            parts += _field(_key(key), value, counter)
    return Logic("and", tuple(parts))


def _key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise InvalidFilter(f"filter keys are strings of 1..{MAX_KEY_CHARS} characters, got {str(key)[:40]!r}",
                            field="filters")
    check_text(key, "filters", InvalidFilter, what="a filter key")
    if key.upper() in ("AND", "OR", "NOT") or key.startswith("$"):
        raise InvalidFilter(f"unknown logical key {key[:40]!r}; use AND, OR or NOT", field="filters")
    if not _PLAIN_KEY.fullmatch(key):
        # Qdrant reads ".", "[]" and quotes as paths into nested values: a key is one top-level field
        raise InvalidFilter(f"filter key {key[:40]!r}: keys are letters, digits, '_' and '-' (one top-level "
                            "payload field)", field="filters")
    if key in UNFILTERABLE:
        raise InvalidFilter(f"filter key {key!r} is memq's own bookkeeping and cannot be filtered on",
                            field="filters")
    return key


def _field(key: str, value: object, counter: list[int]) -> list[Match]:
    if isinstance(value, Mapping):
        if not value:
            raise InvalidFilter(f"filter {key!r} has an empty operator dict", field="filters")
        ops = list(value.items())
    elif value == "*":
        ops = [("exists", None)]
    elif isinstance(value, list):
        ops = [("in", value)]
    else:
        ops = [("eq", value)]
    out: list[Match] = []
    for op, operand in ops:
        counter[0] += 1
        if counter[0] > MAX_CONDITIONS:
            raise InvalidFilter(f"filters hold more than {MAX_CONDITIONS} conditions", field="filters")
        exists = op == "exists" and value == "*"
        out.append(Match(key, "exists") if exists else Match(key, op, _operand(key, op, operand)))
    return out


def _operand(key: str, op: object, value: object) -> Any:
    where = f"filter {key!r}"
    if not isinstance(op, str) or op not in OPERATORS:
        raise InvalidFilter(f"{where}: unknown operator {str(op)[:20]!r}; use one of {sorted(OPERATORS)}",
                            field="filters")
    if op in ("eq", "ne"):
        return _scalar(where, value)
    if op in ("in", "nin"):
        if not isinstance(value, list) or not value or len(value) > MAX_LIST:
            raise InvalidFilter(f"{where}: {op} takes a list of 1..{MAX_LIST} values", field="filters")
        items = tuple(_scalar(where, v) for v in value)
        kinds = {"str" if isinstance(v, str) else "bool" if isinstance(v, bool) else "num" for v in items}
        if len(kinds) > 1 or kinds == {"bool"} or any(isinstance(v, float) for v in items):
            raise InvalidFilter(f"{where}: {op} takes a list of strings or a list of integers", field="filters")
        return items
    if op in RANGES:
        if isinstance(value, datetime):
            return _utc(value)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise InvalidFilter(f"{where}: {op} takes a number or an ISO-8601 date", field="filters") from None
            return _utc(parsed)
        if key in DATE_KEYS:
            raise InvalidFilter(f"{where}: {op} takes an ISO-8601 date or a datetime", field="filters")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise InvalidFilter(f"{where}: {op} takes a number or an ISO-8601 date", field="filters")
    if not isinstance(value, str) or not value:
        raise InvalidFilter(f"{where}: {op} takes a non-empty string", field="filters")
    return _scalar(where, value)


def _utc(when: datetime) -> datetime:
    """An aware datetime in UTC, whole microseconds (naive means UTC)."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _scalar(where: str, value: object) -> Scalar:
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise InvalidFilter(f"{where}: a value of {len(value)} characters; the limit is {MAX_VALUE_CHARS}",
                                field="filters")
        check_text(value, "filters", InvalidFilter, what=where)
        return value
    if isinstance(value, bool) or (isinstance(value, int) and -2**63 <= value < 2**63):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise InvalidFilter(f"{where}: values are strings, 64-bit integers, finite numbers or booleans, "
                        f"got {type(value).__name__}", field="filters")


def has_op(node: Node | None, op: str | Callable[[Match], bool]) -> bool:
    """True when the tree holds a condition with operator `op` (or one the predicate `op` picks)."""
    if node is None:
        return False
    if isinstance(node, Match):
        return op(node) if callable(op) else node.op == op
    return any(has_op(p, op) for p in node.parts)


def relax(node: Node, op: str | Callable[[Match], bool]) -> Node | None:
    """The tree with every `op` condition (or every one the predicate `op` picks) made neutral (true where it would narrow, false under an odd
    number of NOTs), so its matches include all of the original's: backends without `op` apply the
    relaxed tree and `evaluate` the original on what comes back. None: no condition remains."""
    return _relax(node, op, positive=True)


def _relax(node: Node, op: str | Callable[[Match], bool], *, positive: bool) -> Node | None:
    """None: the node became neutral for its polarity (true where `positive`, false under NOT)."""
    if isinstance(node, Match):
        return None if (op(node) if callable(op) else node.op == op) else node
    inner = positive if node.kind != "not" else not positive
    parts = [r for p in node.parts if (r := _relax(p, op, positive=inner)) is not None]
    if len(parts) < len(node.parts):
        # a neutral part decides the whole node (an AND with a false part, an OR with a true one, a NOT
        # of a true part) or simply drops out; which one depends on the node's kind and polarity
        absorbs = {"and": not positive, "or": positive, "not": not positive}[node.kind]
        if absorbs:
            return None
    return Logic(node.kind, tuple(parts)) if parts else None


def evaluate(node: Node | None, payload: Mapping[str, Any]) -> bool:
    """Whether a point's payload matches the tree (the reference semantics every backend follows)."""
    if node is None:
        return True
    if isinstance(node, Logic):
        results = (evaluate(p, payload) for p in node.parts)
        if node.kind == "and":
            return all(results)
        return any(results) if node.kind == "or" else not any(results)
    value = payload.get(node.key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    op = node.op
    if op == "exists":
        return bool(values)
    if op in ("eq", "ne"):
        hit = any(_same(v, node.value) for v in values)
        return hit if op == "eq" else not hit
    if op in ("in", "nin"):
        hit = any(_same(v, w) for v in values for w in node.value)
        return hit if op == "in" else not hit
    if op in RANGES:
        return any(_in_range(v, op, node.value) for v in values)
    if op == "contains":
        return any(isinstance(v, str) and node.value in v for v in values)
    return any(isinstance(v, str) and node.value.casefold() in v.casefold() for v in values)  # icontains


def _same(stored: object, operand: object) -> bool:
    """Equality as Qdrant matches it: a boolean only a boolean, an integer operand only an integer (not
    ``1.0``), a float operand any number of that value (a closed range), a string the same string."""
    if isinstance(operand, bool) or isinstance(stored, bool):
        return isinstance(stored, bool) and stored is operand
    if isinstance(operand, int):
        return isinstance(stored, int) and stored == operand
    if isinstance(operand, float):
        return isinstance(stored, (int, float)) and stored == operand
    return isinstance(stored, str) and stored == operand


def _in_range(v: object, op: str, bound: Any) -> bool:
    if isinstance(bound, datetime):
        if not isinstance(v, str):
            return False
        try:
            when = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return False
        v = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    a: Any = v
    return bool({"gt": a > bound, "gte": a >= bound, "lt": a < bound, "lte": a <= bound}[op])

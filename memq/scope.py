"""Scope checks shared by the producer (adds) and the read helpers (search, get_all)."""

from __future__ import annotations

from memq.checks import check_text
from memq.errors import InvalidScope, MissingScope
from memq.models import Scope


def check_scope_id(name: str, value: object, max_chars: int) -> str | None:
    """Validate one scope id.

    Returns:
        The id, or None when `value` is None.

    Raises:
        InvalidScope: not a string, empty, longer than `max_chars`, with control characters, or not valid
            text (a lone surrogate).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidScope(f"{name} must be a string, got {type(value).__name__}", field=name)
    if not value.strip():
        raise InvalidScope(f"{name} is empty", field=name)
    if len(value) > max_chars:
        raise InvalidScope(f"{name} is {len(value)} characters; the limit is {max_chars}", field=name)
    if any(ord(c) < 32 for c in value):
        raise InvalidScope(f"{name} contains control characters", field=name)
    check_text(value, name, InvalidScope)
    return value


def make_scope(*, user_id: object = None, agent_id: object = None, run_id: object = None,
               max_chars: int = 128) -> Scope:
    """Build a `Scope` from the three ids.

    Raises:
        MissingScope: none of the ids is given.
        InvalidScope: an id is malformed.
    """
    ids = {name: check_scope_id(name, value, max_chars)
           for name, value in (("user_id", user_id), ("agent_id", agent_id), ("run_id", run_id))}
    if not any(ids.values()):
        raise MissingScope("at least one of user_id, agent_id, run_id is required", field="user_id")
    return Scope(**ids)

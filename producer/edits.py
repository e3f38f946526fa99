"""Validation of edit requests (update, delete, delete_all): every check raises `InvalidEdit` (or the
`InvalidMetadata` / `MessageTooLarge` an add would raise for the same text or metadata).

Items take the shape of Mem0's hosted batch calls: ``{"memory_id": ..., "text": ..., "metadata": ...}``
(``data`` is accepted for ``text``, the name of Mem0's ``Memory.update`` argument).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from memq.checks import check_text
from memq.config import LimitsSettings
from memq.errors import InvalidEdit, MessageTooLarge, RequestTooLarge
from memq.models import AddJob, Edit, Operation, Scope
from producer.validate import check_metadata

MAX_BATCH = 1_000
"""Items in one batch_update / batch_delete (Mem0's hosted limit)."""

MAX_MEMORY_ID_CHARS = 128
"""Characters of a memory id (memq's ids are 36-character UUIDs)."""

_UPDATE_KEYS = frozenset({"memory_id", "text", "data", "metadata"})


def check_edits(operation: Operation, items: Sequence[object], limits: LimitsSettings) -> list[Edit]:
    """Validate the items of an update or delete.

    Args:
        operation: ``update`` or ``delete``.
        items: 1..`MAX_BATCH` dicts; each has a ``memory_id`` (1..`MAX_MEMORY_ID_CHARS` characters, not
            repeated), and for an update ``text`` (or ``data``; valid text of at most `max_message_chars`)
            and/or ``metadata`` (a JSON object, checked as an add's metadata: keys set over the old).
        limits: size limits.

    Returns:
        One `Edit` per item, in order.

    Raises:
        InvalidEdit: not a list of dicts, empty or over `MAX_BATCH`, a missing, bad or repeated memory
            id, an unknown key, an update with neither text nor metadata, a text that is not a string.
        MessageTooLarge: a text over `max_message_chars`.
        RequestTooLarge: the texts together over `max_request_chars` (an add's limit).
        InvalidMetadata: metadata as an add would refuse it.
    """
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise InvalidEdit("memories must be a list of dicts with a memory_id", field="memories")
    if not 1 <= len(items) <= MAX_BATCH:
        raise InvalidEdit(f"{len(items)} items; a batch takes 1..{MAX_BATCH}", field="memories")
    edits: list[Edit] = []
    seen: set[str] = set()
    chars = 0
    for i, item in enumerate(items):
        where = f"memories[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidEdit(f"{where} must be a dict with a memory_id, got {type(item).__name__}", field=where)
        allowed = _UPDATE_KEYS if operation is Operation.UPDATE else frozenset({"memory_id"})
        unknown = set(item) - allowed
        if unknown:
            raise InvalidEdit(f"{where} has unknown keys {sorted(str(k)[:40] for k in unknown)}; "
                              f"expected {sorted(allowed)}", field=where)
        memory_id = check_memory_id(item.get("memory_id"), field=f"{where}.memory_id")
        if memory_id in seen:
            raise InvalidEdit(f"{where}.memory_id appears twice in the batch", field=f"{where}.memory_id")
        seen.add(memory_id)
        if operation is Operation.DELETE:
            edits.append(Edit(memory_id=memory_id))
            continue
        if "text" in item and "data" in item:
            raise InvalidEdit(f"{where} has both text and data (the same field); give one", field=where)
        text = item.get("text", item.get("data"))
        metadata = item.get("metadata")
        if text is None and metadata is None:
            raise InvalidEdit(f"{where} changes nothing: give text and/or metadata", field=where)
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise InvalidEdit(f"{where}.text must be a non-empty string", field=f"{where}.text")
            if len(text) > limits.max_message_chars:
                raise MessageTooLarge(f"{where}.text is {len(text)} characters; the limit is "
                                      f"{limits.max_message_chars}", field=f"{where}.text")
            check_text(text, f"{where}.text", InvalidEdit)
            chars += len(text)
            if chars > limits.max_request_chars:
                raise RequestTooLarge(f"the batch's texts hold over {limits.max_request_chars} characters (one "
                                      "embedding call): split it", field="memories")
        edits.append(Edit(memory_id=memory_id, text=text,
                          metadata=check_metadata(metadata, limits) if metadata is not None else None))
    return edits


def check_memory_id(memory_id: object, *, field: str = "memory_id") -> str:
    """A memory id as a caller gave it: a string of 1..`MAX_MEMORY_ID_CHARS` characters; a UUID in any
    spelling Python reads (upper case, braces, ``urn:uuid:``) comes back in the store's spelling
    (lower case, hyphens), anything else as it is (no memory has such an id).

    Raises:
        InvalidEdit: not a string, empty or too long.
    """
    if not isinstance(memory_id, str) or not 1 <= len(memory_id) <= MAX_MEMORY_ID_CHARS:
        raise InvalidEdit(f"{field} must be a string of 1..{MAX_MEMORY_ID_CHARS} characters", field=field)
    try:
        return str(uuid.UUID(memory_id))
    except ValueError:
        return memory_id


def build_edit_job(operation: Operation, scope: Scope, edits: Sequence[Edit] = ()) -> AddJob:
    """The job of an edit of memories of exactly `scope` (the scope the memories themselves have).

    Args:
        operation: ``update`` or ``delete`` (with `edits` from `check_edits`), or ``delete_all`` (none).
        scope: the memories' own scope: the job runs in that scope's order.

    Returns:
        The job, with a fresh random `job_id`.

    Raises:
        InvalidEdit: ``add`` as the operation, or edits that do not fit it.
    """
    if operation is Operation.ADD:
        raise InvalidEdit("an add is built by producer.validate.build_job", field="operation")
    try:
        return AddJob(job_id=str(uuid.uuid4()), scope=scope, operation=operation, edits=list(edits))
    except ValueError as exc:
        raise InvalidEdit(f"{operation.value}: {exc}", field="memories") from exc

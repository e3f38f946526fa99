"""Validation of add requests at the edge: every check raises a named `InvalidRequest` subclass.

Nothing here touches Redis; `producer.client` enqueues only what `build_job` returns.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from memq.config import LimitsSettings
from memq.errors import (
    EmptyMessages,
    InvalidMessage,
    InvalidMetadata,
    InvalidRequest,
    MessageTooLarge,
    MissingScope,
)
from memq.models import AddJob, Message, Role
from memq.scope import make_scope

RESERVED_METADATA_KEYS = frozenset(
    {"data", "hash", "created_at", "updated_at", "user_id", "agent_id", "run_id", "actor_id", "role",
     "source_message_ids", "job_id", "memory"}
)
"""Payload keys memq writes itself; metadata may not shadow them (a scope must not be forged)."""

_MESSAGE_KEYS = frozenset({"role", "content", "name", "id", "message_id"})
_ROLES = {r.value for r in Role}


def _normalize_messages(messages: object) -> list[Mapping[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if isinstance(messages, Mapping):
        return [messages]
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise InvalidMessage(f"messages[{i}] must be a dict with role and content, got {type(m).__name__}",
                                     field=f"messages[{i}]")
        return messages
    raise InvalidMessage(f"messages must be a string, a message dict or a list of them, got {type(messages).__name__}",
                         field="messages")


def _check_part(where: str, part: object) -> None:
    if not isinstance(part, Mapping):
        raise InvalidMessage(f"{where} must be a content part dict, got {type(part).__name__}", field=where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidMessage(f"{where} is a text part without a string 'text'", field=where)
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        if not isinstance(url, str) or not url:
            raise InvalidMessage(f"{where} is an image_url part without a url", field=where)
    else:
        raise InvalidMessage(f"{where} has non-text content of type {kind!r}; only 'text' and 'image_url' parts "
                             "are accepted", field=where)


def _check_message(i: int, raw: Mapping[str, Any], max_chars: int) -> Message:
    where = f"messages[{i}]"
    unknown = set(raw) - _MESSAGE_KEYS
    if unknown:
        raise InvalidMessage(f"{where} has unknown keys {sorted(unknown)}", field=where)
    role = raw.get("role")
    if role not in _ROLES:
        raise InvalidMessage(f"{where}.role is {role!r}; expected one of {sorted(_ROLES)}", field=f"{where}.role")
    content = raw.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(f"{where}.content[{j}]", part)
        content = [dict(p, image_url={"url": p["image_url"]}) if p.get("type") == "image_url"
                   and isinstance(p.get("image_url"), str) else p for p in content]
    elif not isinstance(content, str):
        raise InvalidMessage(f"{where}.content has non-text content of type {type(content).__name__}; expected a "
                             "string or a list of text/image_url parts", field=f"{where}.content")
    for key in ("name", "id", "message_id"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise InvalidMessage(f"{where}.{key} must be a string", field=f"{where}.{key}")
    try:
        message = Message.model_validate({**raw, "content": content})
    except ValidationError as exc:
        raise InvalidMessage(f"{where} is malformed: {exc.errors()[0]['msg']}", field=where) from exc
    if len(message.text) > max_chars:
        raise MessageTooLarge(f"{where} has {len(message.text)} characters; the limit is {max_chars}", field=where)
    return message


def _check_metadata(metadata: object, max_bytes: int) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadata(f"metadata must be a JSON object (dict), got {type(metadata).__name__}", field="metadata")
    reserved = RESERVED_METADATA_KEYS.intersection(metadata)
    if reserved:
        raise InvalidMetadata(f"metadata keys {sorted(reserved)} are reserved by memq", field="metadata")
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadata(f"metadata is not JSON-serializable: {exc}", field="metadata") from exc
    if len(encoded.encode()) > max_bytes:
        raise InvalidMetadata(f"metadata is {len(encoded.encode())} bytes as JSON; the limit is {max_bytes}",
                              field="metadata")
    if not all(isinstance(k, str) for k in metadata):
        raise InvalidMetadata("metadata keys must be strings", field="metadata")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def _check_timestamp(timestamp: object) -> datetime | None:
    if timestamp is None:
        return None
    if isinstance(timestamp, bool):
        raise InvalidRequest("timestamp must be a datetime, an ISO-8601 string or epoch seconds", field="timestamp")
    if isinstance(timestamp, (int, float)):
        if not math.isfinite(timestamp):
            raise InvalidRequest("timestamp must be finite", field="timestamp")
        return datetime.fromtimestamp(timestamp, tz=timezone.utc)
    if isinstance(timestamp, str):
        try:
            timestamp = datetime.fromisoformat(timestamp)
        except ValueError as exc:
            raise InvalidRequest(f"timestamp {timestamp!r} is not ISO-8601", field="timestamp") from exc
    if not isinstance(timestamp, datetime):
        raise InvalidRequest("timestamp must be a datetime, an ISO-8601 string or epoch seconds", field="timestamp")
    return timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=timezone.utc)


def build_job(
    messages: object,
    *,
    limits: LimitsSettings,
    user_id: object = None,
    agent_id: object = None,
    run_id: object = None,
    metadata: object = None,
    infer: object = True,
    memory_type: object = None,
    prompt: object = None,
    timestamp: object = None,
    idempotency_key: object = None,
) -> AddJob:
    """Validate one add request and build its job.

    Args:
        messages: a string, one OpenAI-style message dict, or a list of them; ``role`` in
            system/user/assistant, ``content`` a string or a list of ``text``/``image_url`` parts;
            optional ``name`` (speaker) and ``id`` (provenance id such as LoCoMo's ``dia_id``).
        limits: size limits (characters, bytes, counts).
        user_id, agent_id, run_id: the scope; at least one, each 1..`max_scope_id_chars` characters.
        metadata: a JSON object stored with every memory of the job; reserved keys are refused.
        infer: False stores each message as a memory without calling the model.
        memory_type: None, or ``"procedural_memory"`` (needs `agent_id`).
        prompt: a custom fact-extraction prompt.
        timestamp: backdates the memories: datetime, ISO-8601 string or epoch seconds (UTC if naive).
        idempotency_key: within the scope, the same key yields the same job (at most one job per key
            and scope while its records live); keys of different scopes never meet.

    Returns:
        The validated `AddJob` with a fresh random `job_id` (an idempotency key the scope has used
        makes the enqueue return the earlier job instead).

    Raises:
        MissingScope, InvalidScope, EmptyMessages, InvalidMessage, MessageTooLarge, InvalidMetadata,
        InvalidRequest: what is wrong, with the field at fault in ``.field``.
    """
    scope = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id, max_chars=limits.max_scope_id_chars)
    raw_messages = _normalize_messages(messages)
    if len(raw_messages) > limits.max_messages:
        raise InvalidMessage(f"{len(raw_messages)} messages; the limit is {limits.max_messages}", field="messages")
    checked = [_check_message(i, m, limits.max_message_chars) for i, m in enumerate(raw_messages)]
    if not any(m.text.strip() or m.images for m in checked):
        raise EmptyMessages("messages hold no text and no image", field="messages")
    if not isinstance(infer, bool):
        raise InvalidRequest("infer must be True or False", field="infer")
    if memory_type not in (None, "procedural_memory"):
        raise InvalidRequest(f"memory_type {memory_type!r} is not supported; use None or 'procedural_memory'",
                             field="memory_type")
    if memory_type == "procedural_memory" and not scope.agent_id:
        raise MissingScope("procedural_memory needs an agent_id", field="agent_id")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise InvalidRequest("prompt must be a non-empty string", field="prompt")
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key
                                        or len(idempotency_key) > 512):
        raise InvalidRequest("idempotency_key must be a string of 1..512 characters", field="idempotency_key")
    return AddJob(
        job_id=str(uuid.uuid4()),  # random, never derived from caller strings (ids of memories derive from it)
        scope=scope,
        messages=checked,
        metadata=_check_metadata(metadata, limits.max_metadata_bytes),
        infer=infer,
        memory_type=memory_type,
        prompt=prompt,
        timestamp=_check_timestamp(timestamp),
        idempotency_key=idempotency_key,
    )

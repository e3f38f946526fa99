"""Validation of add requests at the edge: every check raises a named `InvalidRequest` subclass.

Nothing here touches Redis; `producer.client` enqueues only what `build_job` returns.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from memq.checks import RESERVED_KEYS, check_json, check_text, check_timestamp
from memq.config import LimitsSettings
from memq.errors import (
    EmptyMessages,
    InvalidMessage,
    InvalidMetadata,
    InvalidOption,
    MessageTooLarge,
    MissingScope,
    RequestTooLarge,
)
from memq.images import Network, check_image_url, parse_data_url
from memq.models import AddJob, ImagePart, Message, Role, TextPart
from memq.scope import make_scope

RESERVED_METADATA_KEYS = RESERVED_KEYS
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
        raise InvalidMessage(f"{where} has non-text content of type {str(kind)[:40]!r}; only 'text' and "
                             "'image_url' parts are accepted", field=where)


def _check_message(i: int, raw: Mapping[str, Any], limits: LimitsSettings) -> Message:
    where = f"messages[{i}]"
    unknown = set(raw) - _MESSAGE_KEYS
    if unknown:
        raise InvalidMessage(f"{where} has unknown keys {sorted(str(k)[:40] for k in unknown)}", field=where)
    role = raw.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidMessage(f"{where}.role is {str(role)[:40]!r}; expected one of {sorted(_ROLES)}",
                             field=f"{where}.role")
    content = raw.get("content")
    if isinstance(content, list):
        if len(content) > limits.max_content_parts:
            raise MessageTooLarge(f"{where}.content has {len(content)} parts; the limit is "
                                  f"{limits.max_content_parts}", field=f"{where}.content")
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
    _check_message_sizes(where, message, limits)
    for field, text in _message_strings(where, message):
        check_text(text, field, InvalidMessage)
    return message


def _check_message_sizes(where: str, message: Message, limits: LimitsSettings) -> None:
    if len(message.text) > limits.max_message_chars:
        raise MessageTooLarge(f"{where} has {len(message.text)} characters; the limit is {limits.max_message_chars}",
                              field=where)
    for key, value, limit in (("name", message.name, limits.max_name_chars),
                              ("id", message.message_id, limits.max_message_id_chars)):
        if value is not None and len(value) > limit:
            raise MessageTooLarge(f"{where}.{key} has {len(value)} characters; the limit is {limit}",
                                  field=f"{where}.{key}")
    for j, part in enumerate(message.content if isinstance(message.content, list) else []):
        for key in ("caption", "alt"):
            text = getattr(part, key, None)
            if text is not None and len(text) > limits.max_caption_chars:
                raise MessageTooLarge(f"{where}.content[{j}].{key} has {len(text)} characters; the limit is "
                                      f"{limits.max_caption_chars}", field=f"{where}.content[{j}].{key}")
    for url in message.images:
        if len(url) > limits.max_image_url_chars:
            raise MessageTooLarge(f"{where} has an image URL of {len(url)} characters; the limit is "
                                  f"{limits.max_image_url_chars} (pass large images by http(s) URL)",
                                  field=f"{where}.content")


def _message_strings(where: str, message: Message) -> list[tuple[str, str]]:
    """Every string of a message, with the field it sits in."""
    found: list[tuple[str, str]] = []
    if isinstance(message.content, str):
        found.append((f"{where}.content", message.content))
    else:
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                found.append((f"{where}.content[{j}].text", part.text))
            elif isinstance(part, ImagePart):
                found.append((f"{where}.content[{j}].image_url", part.image_url.url))
                if part.image_url.detail is not None:
                    found.append((f"{where}.content[{j}].image_url", part.image_url.detail))
                for key in ("caption", "alt"):
                    if getattr(part, key) is not None:
                        found.append((f"{where}.content[{j}].{key}", getattr(part, key)))
    if message.name is not None:
        found.append((f"{where}.name", message.name))
    if message.message_id is not None:
        found.append((f"{where}.id", message.message_id))
    return found


def _check_totals(messages: list[Message], prompt: str | None, limits: LimitsSettings) -> None:
    text_chars = len(prompt or "") + sum(len(m.text) + len(m.name or "") + len(m.message_id or "")
                                         + sum(len(p.supplied_caption or "") for p in m.image_parts) for m in messages)
    if text_chars > limits.max_request_chars:
        raise RequestTooLarge(f"the request holds {text_chars} characters of text (messages, names, ids, prompt); "
                              f"the limit is {limits.max_request_chars}: split it into several adds",
                              field="messages")
    images = sum(len(m.image_parts) for m in messages)
    if images > limits.max_images:
        raise RequestTooLarge(f"the request holds {images} images; the limit is {limits.max_images}: split it "
                              "into several adds", field="messages")
    image_chars = sum(len(url) for m in messages for url in m.images)
    if image_chars > limits.max_request_image_url_chars:
        raise RequestTooLarge(f"the request's image URLs hold {image_chars} characters; the limit is "
                              f"{limits.max_request_image_url_chars}: split it into several adds", field="messages")


def _check_images(messages: list[Message], limits: LimitsSettings, networks: tuple[Network, ...]) -> None:
    """Every image URL is a checked image: ``data:`` URLs decoded (type, base64, magic bytes, size),
    http(s) URLs judged by their text (no DNS lookup here; the fetcher checks resolved addresses)."""
    for i, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else []
        for j, part in enumerate(parts):
            if not isinstance(part, ImagePart):
                continue
            where, url = f"messages[{i}].content[{j}].image_url", part.image_url.url
            if part.image_url.detail not in (None, "auto", "low", "high"):
                raise InvalidMessage(f"{where}.detail is {part.image_url.detail[:20]!r}; use auto, low or high",
                                     field=f"{where}.detail")
            if url[:5].lower() == "data:":
                parse_data_url(url, max_bytes=limits.max_image_bytes, field=where)
            else:
                check_image_url(url, field=where, allow=networks)


def check_metadata(metadata: object, limits: LimitsSettings) -> dict[str, Any]:
    """Metadata as a plain JSON object, checked (no reserved key, depth, size); {} for None.

    Raises:
        InvalidMetadata: not a JSON object of JSON values, a reserved key, too deep or too large.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadata(f"metadata must be a JSON object (dict), got {type(metadata).__name__}", field="metadata")
    metadata = dict(metadata)
    reserved = RESERVED_METADATA_KEYS.intersection(k for k in metadata if isinstance(k, str))
    if reserved:
        raise InvalidMetadata(f"metadata keys {sorted(reserved)} are reserved by memq", field="metadata")
    check_json(metadata, "metadata", InvalidMetadata, max_depth=limits.max_metadata_depth)
    encoded = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    size = len(encoded.encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise InvalidMetadata(f"metadata is {size} bytes as JSON; the limit is {limits.max_metadata_bytes}",
                              field="metadata")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def _check_options(infer: object, memory_type: object, prompt: object, idempotency_key: object,
                   limits: LimitsSettings) -> None:
    if not isinstance(infer, bool):
        raise InvalidOption(f"infer must be True or False, got {type(infer).__name__}", field="infer")
    if memory_type is not None and memory_type != "procedural_memory":
        raise InvalidOption(f"memory_type {str(memory_type)[:40]!r} is not supported; use None or "
                            "'procedural_memory'", field="memory_type")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidOption("prompt must be a non-empty string", field="prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidOption(f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                                field="prompt")
        check_text(prompt, "prompt", InvalidOption)
    if idempotency_key is not None:
        if (not isinstance(idempotency_key, str) or not idempotency_key
                or len(idempotency_key) > limits.max_idempotency_key_chars):
            raise InvalidOption(f"idempotency_key must be a string of 1..{limits.max_idempotency_key_chars} "
                                "characters", field="idempotency_key")
        check_text(idempotency_key, "idempotency_key", InvalidOption)


def build_job(
    messages: object,
    *,
    limits: LimitsSettings,
    image_networks: tuple[Network, ...] = (),
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
    """Validate one add request and build its job; what passes here, the worker can process.

    Every string in the request must be valid text: encodable as UTF-8 (no lone surrogate) and without
    U+0000, as requests are stored as JSON in Redis and history rows in SQL.

    Args:
        messages: a string, one OpenAI-style message dict, or a list of 1..`max_messages` of them; ``role``
            in system/user/assistant, ``content`` a string (at most `max_message_chars`) or a list of at
            most `max_content_parts` ``text``/``image_url`` parts (each URL at most `max_image_url_chars`);
            optional ``name`` (speaker, at most `max_name_chars`) and ``id`` (provenance id such as
            LoCoMo's ``dia_id``, at most `max_message_id_chars`).
        limits: size limits (characters, bytes, counts).
        image_networks: private networks whose literal addresses image URLs may name (the operator's own
            image hosts, ``MEMQ_VISION__ALLOW_NETWORKS``).
        user_id, agent_id, run_id: the scope; at least one, each 1..`max_scope_id_chars` characters.
        metadata: a JSON object (string keys, at most `max_metadata_depth` levels and
            `max_metadata_bytes` as JSON) stored with every memory of the job; reserved keys are refused.
        infer: False stores each message as a memory without calling the model.
        memory_type: None, or ``"procedural_memory"`` (needs `agent_id`).
        prompt: a custom fact-extraction prompt (at most `max_prompt_chars`).
        timestamp: backdates the memories: datetime, ISO-8601 string or epoch seconds (UTC if naive),
            between `memq.checks.EARLIEST_TIMESTAMP` and `LATEST_TIMESTAMP`.
        idempotency_key: within the scope, the same key yields the same job (at most one job per key
            and scope while its records live); keys of different scopes never meet.
            1..`max_idempotency_key_chars` characters.

    Returns:
        The validated `AddJob` with a fresh random `job_id` (an idempotency key the scope has used
        makes the enqueue return the earlier job instead).

    Raises:
        MissingScope: no scope id, or procedural_memory without agent_id.
        InvalidScope: a scope id of the wrong type, empty, too long or not valid text.
        EmptyMessages: no message with text or an image.
        InvalidMessage: bad messages: type, keys, role, content, or a string that is not valid text.
        MessageTooLarge: a message's text, name, id, part count, image URL or supplied caption over its limit.
        InvalidImage: a ``data:`` image of a type other than PNG/JPEG/GIF/WebP, invalid base64, or bytes
            that do not match the declared type.
        ImageTooLarge: a ``data:`` image over `max_image_bytes` decoded.
        UnsafeImageURL: an image URL that is not http(s)/``data:``, carries credentials, or names a
            loopback, private, link-local, reserved or metadata host (`memq.images.check_image_url`).
        RequestTooLarge: the text (messages, names, ids, prompt), the image count or the image URLs of the
            whole add over `max_request_chars`, `max_images` or `max_request_image_url_chars`.
        InvalidMetadata: metadata not a JSON object of JSON values, with a reserved key, too deep or too large.
        InvalidOption: infer, memory_type, prompt or idempotency_key of a bad type or value.
        InvalidTimestamp: a timestamp of a bad type, unparsable, or out of range.
        All are `InvalidRequest` subclasses with the field at fault in ``.field``.
    """
    scope = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id, max_chars=limits.max_scope_id_chars)
    raw_messages = _normalize_messages(messages)
    if len(raw_messages) > limits.max_messages:
        raise InvalidMessage(f"{len(raw_messages)} messages; the limit is {limits.max_messages}", field="messages")
    checked = [_check_message(i, m, limits) for i, m in enumerate(raw_messages)]
    if not any(m.text.strip() or m.images for m in checked):
        raise EmptyMessages("messages hold no text and no image", field="messages")
    _check_options(infer, memory_type, prompt, idempotency_key, limits)
    if memory_type == "procedural_memory" and not scope.agent_id:
        raise MissingScope("procedural_memory needs an agent_id", field="agent_id")
    _check_totals(checked, prompt if isinstance(prompt, str) else None, limits)
    _check_images(checked, limits, image_networks)
    return AddJob(
        job_id=str(uuid.uuid4()),  # random, never derived from caller strings (ids of memories derive from it)
        scope=scope,
        messages=checked,
        metadata=check_metadata(metadata, limits),
        infer=bool(infer),
        memory_type="procedural_memory" if memory_type is not None else None,
        prompt=prompt if isinstance(prompt, str) else None,
        timestamp=check_timestamp(timestamp),
        idempotency_key=idempotency_key if isinstance(idempotency_key, str) else None,
    )

"""Poison messages: broker messages no worker can run are moved aside, counted, and consumption goes on.

A message is poison when the worker cannot turn it into a task: bytes that are not JSON, JSON that is
not a kombu envelope, a body that cannot be decoded, or a task name no worker knows. Such a message
is pushed, as the raw bytes that were read, onto the Redis list `POISON_KEY` (newest first, capped at
`POISON_CAP` entries) and `POISON_COUNT_KEY` is incremented, in one transaction. One WARNING line names
the queue and the reason; the content (which may hold user data) is logged at DEBUG only.

The idea is the dead-letter queue of AMQP brokers (RabbitMQ's ``x-dead-letter-exchange``), which
Redis lists do not have; the list can be read with `poison_messages` and `poison_count`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import redis

POISON_KEY = "memq:poison"
"""Redis list of the raw bytes of poison messages, newest first."""
POISON_COUNT_KEY = "memq:poison:count"
"""Redis counter of poison messages ever moved aside (the list is capped, the counter is not)."""
POISON_CAP = 10_000
"""Most entries kept in `POISON_KEY`; older ones are trimmed."""

logger = logging.getLogger(__name__)


def quarantine(client: redis.Redis, raw: bytes, *, queue: str, reason: str) -> None:
    """Move one poison message aside: LPUSH it, LTRIM the list to `POISON_CAP`, INCR the counter.

    Args:
        client: a Redis client on the broker's database.
        raw: the message as read from the queue (stored unchanged, so it can be pushed back).
        queue: the queue it was read from (logged).
        reason: why it cannot run, without any of its content (logged).

    Raises:
        redis.exceptions.ConnectionError: Redis is unreachable; nothing was stored.
    """
    with client.pipeline(transaction=True) as pipe:
        pipe.lpush(POISON_KEY, raw)
        pipe.ltrim(POISON_KEY, 0, POISON_CAP - 1)
        pipe.incr(POISON_COUNT_KEY)
        pipe.execute()
    logger.warning("poison message on queue %s moved to %s: %s", queue, POISON_KEY, reason)
    logger.debug("poison message content (%d bytes): %r", len(raw), raw[:2000])


def poison_count(client: redis.Redis) -> int:
    """How many poison messages were ever moved aside.

    Args:
        client: a Redis client on the broker's database.

    Returns:
        The value of `POISON_COUNT_KEY` (0 when none).

    Raises:
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    value = client.get(POISON_COUNT_KEY)
    return int(value) if value is not None else 0


def poison_messages(client: redis.Redis, limit: int = 100) -> list[bytes]:
    """The raw bytes of the newest poison messages.

    Args:
        client: a Redis client on the broker's database (bytes responses, the default).
        limit: most messages to return.

    Returns:
        Up to `limit` messages, newest first.

    Raises:
        redis.exceptions.ConnectionError: Redis is unreachable.
    """
    if limit <= 0:
        return []
    items: list[Any] = client.lrange(POISON_KEY, 0, limit - 1)
    return [item if isinstance(item, bytes) else str(item).encode() for item in items]


def envelope_problem(payload: object) -> str | None:
    """Why `payload` is not a kombu Redis envelope a consumer can build a message from, if it is not.

    Checks what kombu's virtual ``Message`` and ack emulation read: a ``properties`` object with a
    ``delivery_tag`` and a ``delivery_info`` holding ``exchange`` and ``routing_key``, and a ``body``
    that decodes with its ``body_encoding`` (base64 or none).

    Args:
        payload: the decoded JSON of one message.

    Returns:
        A short reason without any of the message's content, or None for a usable envelope.
    """
    if not isinstance(payload, dict):
        return "not a kombu envelope (not a JSON object)"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "not a kombu envelope (no properties)"
    if not isinstance(properties.get("delivery_tag"), str):
        return "not a kombu envelope (no delivery_tag)"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "not a kombu envelope (no delivery_info)"
    if not isinstance(payload.get("headers", {}), (dict, type(None))):
        return "not a kombu envelope (headers is not an object)"
    body, encoding = payload.get("body"), properties.get("body_encoding")
    if not body:
        return None
    if not isinstance(body, str):
        return "body is not a string"
    if isinstance(encoding, str) and encoding.lower() == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    elif encoding is not None and not (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        return "unknown body_encoding"
    return None

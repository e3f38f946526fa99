"""memq's kombu Redis transport: kombu's, plus two guards that keep a worker consuming.

Used by the worker's connections (`broker.consumer.Consumer` passes it as kombu's ``transport``
argument); ``redis://`` URLs stay as they are, because kombu only derives the transport from the URL
scheme when none is given.

1. A channel whose kombu connection was already released never raises ``AttributeError``.
   Celery's consumer, on a lost connection, calls ``Connection.collect()`` (which detaches the
   transport: ``transport.client = None``) and then ``Connection.close()``. When the task channel had
   a BRPOP in flight, its first close fails on that BRPOP before it is marked closed, so the second
   close runs ``QoS.restore_unacked`` against a released connection: kombu 5.7's
   ``Channel._connparams`` reads ``self.connection.client.hostname`` and raises ``AttributeError``,
   which no cleanup handler ignores, so the consumer dies (kombu issues #970 and #582 are the same
   dereference on other paths). Here that case is a ``redis`` connection error (`ConnectionReleased`),
   which every cleanup path already handles, and restoring at close leaves the unacked messages where
   they are: in Redis's ``unacked`` hash, from which the visibility-timeout sweep brings them back.

2. A malformed message read by BRPOP is moved aside (`broker.poison`) instead of raising out of the
   event loop, which made the worker exit; the BRPOP had already removed it from its queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis
from kombu.utils import encoding as kombu_encoding
from kombu.utils import json as kombu_json

from broker.poison import envelope_problem, quarantine

logger = logging.getLogger(__name__)

_to_str: Callable[[bytes | str], str] = kombu_encoding.bytes_to_str
_loads: Callable[[str], Any] = kombu_json.loads  # kombu's JSON, as its own read path uses


class ConnectionReleased(redis.exceptions.ConnectionError):
    """The channel's kombu connection was released: no new Redis connection can be made from it."""


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, that leaves unacked messages to the sweep once released."""

    def restore_unacked(self, client: Any = None) -> None:
        """Put this channel's unacked messages back on their queues (kombu's behaviour at close).

        After the connection was released nothing is sent: the messages stay in Redis's ``unacked``
        hash and come back once ``visibility_timeout`` has passed, through the sweep of any worker.

        Args:
            client: a Redis client to use; one from the channel's pool when None.

        Raises:
            redis.exceptions.ConnectionError: Redis is unreachable (kombu's cleanup ignores it).
        """
        if client is None and self.channel.released:
            if self._delivered:
                logger.info("broker connection already released: %d unacked message(s) stay in Redis "
                            "until the visibility timeout brings them back", len(self._delivered))
            self._delivered.clear()
            return
        super().restore_unacked(client)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with the two guards of this module."""

    QoS = QoS

    @property
    def released(self) -> bool:
        """True once the channel's transport has no kombu connection (closed or collected)."""
        return self.connection is None or self.connection.client is None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """kombu's connection parameters, or a connection error once released.

        Raises:
            ConnectionReleased: the kombu connection was released (kombu raises ``AttributeError``).
        """
        if self.released:
            raise ConnectionReleased("the broker connection of this channel was released")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        return params

    def _brpop_read(self, **options: Any) -> bool:
        """Read one BRPOP reply and deliver its message, or move a malformed one aside.

        Follows kombu 5.7's ``Channel._brpop_read``; only the decoding differs (see `_admit`).

        Args:
            options: passed to redis-py's ``parse_response``.

        Returns:
            True when a message was read (delivered or moved aside).

        Raises:
            queue.Empty: BRPOP timed out without a message.
            redis.exceptions.ConnectionError: the connection broke (it is dropped, to reconnect).
        """
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not reply:
                raise Empty()
            key, raw = reply
            queue = _to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = self._admit(queue, raw)
            if payload is not None:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's own value for 'no BRPOP sent'
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush_reauth is not None:
                flush_reauth()

    def _admit(self, queue: str, raw: bytes) -> dict[str, Any] | None:
        """Decode one message read from `queue`, or move it aside when it is not a usable envelope.

        Args:
            queue: the queue it was read from.
            raw: the bytes BRPOP returned.

        Returns:
            The envelope to deliver, or None when the message went to the poison list.

        Raises:
            redis.exceptions.ConnectionError: Redis is unreachable while moving it aside.
        """
        try:
            payload: Any = _loads(_to_str(raw))
        except (TypeError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason: str | None = "not JSON"
        else:
            reason = envelope_problem(payload)
        if reason is None:
            envelope: dict[str, Any] = payload
            return envelope
        with self.conn_or_acquire() as client:
            quarantine(client, raw, queue=queue, reason=reason)
        return None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel`."""

    Channel = Channel

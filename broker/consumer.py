"""memq's Celery consumer: memq's transport, poison messages aside, and a dead consumer ends the worker.

Selected with ``worker_consumer = "broker.consumer:Consumer"`` (`celeryconfig`). Its broker connections
use `broker.transport.Transport` (passed as kombu's ``transport`` argument, which the ``redis://`` URL
scheme does not override). Only the worker's connections do: a global ``broker_transport`` would also
make ``Connection.as_uri()`` start with the class path instead of ``redis://``, and Flower, which picks
its broker client by that scheme, would lose its broker page.

Celery's hooks for messages it cannot run log the message body (user data, for memq) and drop the
message; here they move it to the poison list instead (`broker.poison`), logging only the queue and
the reason. Messages that are not even kombu envelopes never get this far (`broker.transport`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.exceptions import WorkerShutdown, WorkerTerminate
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from kombu.utils import json as kombu_json

from broker.poison import quarantine
from broker.watchdog import exit_soon

logger = logging.getLogger(__name__)

_dumps: Callable[[Any], str] = kombu_json.dumps
_SHUTDOWN = (WorkerShutdown, WorkerTerminate, SystemExit, KeyboardInterrupt)
_BAD_DATA = (TypeError, ValueError, KeyError, IndexError)
"""What a malformed task message raises while Celery reads it (KeyError would count as a lost
connection for the Redis transport, and the message would come back forever)."""


def _raw_bytes(message: Any) -> bytes:
    """The message as kombu's Redis transport stores it (its envelope as JSON)."""
    raw = getattr(message, "_raw", None)
    if isinstance(raw, dict):
        return _dumps(raw).encode()
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with poison-message hooks and an exit deadline once it has stopped.

    Attributes:
        broker_transport: the kombu transport of the worker's connections.
        exit_grace_s: seconds a worker may stay up after its consumer died (the warm shutdown
            waits for running tasks) before it is ended with status 70.
    """

    exit_grace_s = 15.0
    broker_transport = "broker.transport:Transport"

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The consuming connection (Celery's, on `broker_transport`), connected.

        Args:
            heartbeat: broker heartbeat in seconds (unused by Redis).

        Returns:
            A connected ``kombu.Connection``.
        """
        return self.ensure_connected(self.app.connection_for_read(heartbeat=heartbeat,
                                                                  transport=self.broker_transport))

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None) -> Any:
        """The connection for events (Celery's, on `broker_transport`), connected.

        Args:
            url: broker URL; Celery's write URL when None.
            heartbeat: broker heartbeat in seconds (unused by Redis).

        Returns:
            A connected ``kombu.Connection``.
        """
        return self.ensure_connected(self.app.connection_for_write(url=url, heartbeat=heartbeat,
                                                                   transport=self.broker_transport))

    def start(self) -> None:
        """Consume until shutdown; when consuming ends on an error, make sure the process exits.

        Raises:
            Exception: whatever stopped the consumer (Celery then starts a warm shutdown, status 1;
                `exit_soon` ends the process if that shutdown takes longer than `exit_grace_s`).
        """
        try:
            super().start()
        except _SHUTDOWN:
            raise
        except BaseException as exc:
            # `celery worker` consumes in its main thread; an embedded worker (a thread of a test
            # process, say) leaves its process to its caller
            if threading.current_thread() is threading.main_thread():
                logger.critical("consumer stopped on %s; the worker exits (at most %.0f s from now) so it can "
                                "be restarted", type(exc).__name__, self.exit_grace_s)
                exit_soon(self.exit_grace_s, f"consumer stopped on {type(exc).__name__}")
            raise

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's task-message handler, guarded: a message that breaks it goes to the poison list.

        Returns:
            The handler, called with each kombu message.
        """
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except _BAD_DATA as exc:
                if message.acknowledged:
                    raise
                self._poison(message, f"task message cannot be read ({type(exc).__name__})")
                return None

        return on_task_received

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message that is not a Celery task message: moved to the poison list."""
        self._poison(message, "not a Celery task message")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """A task name this worker does not know: moved to the poison list."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = str(headers.get("task", "?"))[:80]
        self._poison(message, f"unknown task {name!r}")
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        """A task message that breaks Celery's protocol: moved to the poison list."""
        self._poison(message, f"invalid task message ({type(exc).__name__})")
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        """A body that cannot be deserialized: moved to the poison list."""
        self._poison(message, f"body cannot be decoded ({type(exc).__name__})")

    def _poison(self, message: Any, reason: str) -> None:
        """Move `message` to the poison list, then remove it from the queue's unacked set.

        Raises:
            redis.exceptions.ConnectionError: Redis is unreachable; the message stays unacked and
                comes back (the consumer reconnects).
        """
        queue = str((message.delivery_info or {}).get("routing_key") or "?")
        with message.channel.conn_or_acquire() as client:
            quarantine(client, _raw_bytes(message), queue=queue, reason=reason)
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors)

"""What operators ask the broker: which workers consume which queue, and how deep each queue is.

Uses Celery's remote control over Redis (``inspect().active_queues()``: every running worker answers
with the queues it consumes) from a bare Celery app on the configured broker, so asking needs no
worker code and no store.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from celery import Celery

from memq.config import Queues, Settings
from memq.errors import BrokerUnavailable


def consumers(settings: Settings, *, timeout_s: float = 1.5) -> dict[str, list[str]]:
    """The workers consuming each memq queue, by queue name.

    Args:
        settings: memq settings (the broker URL).
        timeout_s: how long to collect workers' answers (seconds); a worker that answers later is missed.

    Returns:
        ``{queue: [worker node name, ...]}`` for every queue of `Queues.ALL` (an empty list: nobody
        consumes it).

    Raises:
        BrokerUnavailable: Redis is unreachable.
    """
    app = Celery("memq-inspect", broker=settings.redis.url)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_max_retries = 1  # (0 would mean "retry forever" to Celery)
    app.conf.broker_connection_timeout = timeout_s
    try:
        answers = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"Redis unreachable asking the workers: {type(exc).__name__}") from exc
    finally:
        app.close()
    found: dict[str, list[str]] = {q: [] for q in Queues.ALL}
    for node, queues in answers.items():
        for queue in queues or []:
            found.setdefault(str(queue.get("name")), []).append(str(node))
    return found


def depths(client: redis.Redis, queues: Sequence[str] = Queues.ALL) -> dict[str, int]:
    """Messages waiting in each queue (ready to be taken; countdown messages and unacknowledged ones
    are elsewhere), by queue name.

    Raises:
        BrokerUnavailable: Redis is unreachable.
    """
    try:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        return {q: int(n) for q, n in zip(queues, pipe.execute())}
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"Redis: {type(exc).__name__}") from exc

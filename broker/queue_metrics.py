"""Prometheus gauges read from Redis when scraped: how much work waits, and for how long.

``memq_queue_depth{queue}`` (messages ready in each queue), ``memq_queue_oldest_job_seconds{queue}``
(the age of the job whose message is next out of each queue), ``memq_unfinished_jobs``,
``memq_oldest_unfinished_job_seconds`` and ``memq_jobs_waiting_for_scope`` (unfinished jobs whose
decide waits for an earlier job of their scope: the scope backlog; counted over the oldest
`SAMPLE` unfinished jobs, so one scrape costs at most that many field reads).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.jobstore import LIVE_KEY
from memq.config import Queues

logger = logging.getLogger(__name__)

SAMPLE = 1_000
"""Unfinished jobs (oldest first) whose waiting state one scrape reads."""

CACHE_S = 5.0
"""Seconds a reading is reused: scrapes and healthchecks close together cost Redis one reading."""


class QueueCollector(Collector):
    """Gauges of the broker's backlog, read from Redis at each scrape (nothing is kept in between).

    Args:
        redis_url: the broker.

    A scrape while Redis is down yields no gauge (and logs a warning), never an error page.
    """

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily]] = (0.0, [])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges (see the module docstring), read at most once per `CACHE_S` seconds."""
        with self._lock:
            at, families = self._cached
            if time.monotonic() - at > CACHE_S:
                families = list(self._read())
                self._cached = (time.monotonic(), families)
        yield from families

    def _head_ages(self, heads: list[bytes | None]) -> list[float]:
        """Seconds since each queue's next job was accepted (its score in the live set), 0 for none."""
        job_ids = [_job_of(raw) for raw in heads]
        pipe = self._client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zscore(LIVE_KEY, job_id or "")
        now = time.time()
        return [max(0.0, now - float(score)) if score is not None else 0.0 for score in pipe.execute()]

    def _read(self) -> Iterator[GaugeMetricFamily]:
        try:
            pipe = self._client.pipeline(transaction=False)
            for queue in Queues.ALL:
                pipe.llen(queue)
            for queue in Queues.ALL:
                pipe.lindex(queue, -1)  # the next message out (LPUSH in, BRPOP out)
            pipe.zcard(LIVE_KEY)
            pipe.zrange(LIVE_KEY, 0, SAMPLE - 1, withscores=True)
            replies = pipe.execute()
            n = len(Queues.ALL)
            lengths, heads, (live, oldest) = replies[:n], replies[n:2 * n], replies[2 * n:]
            ages = self._head_ages(heads)
            waits = self._client.pipeline(transaction=False)
            for job_id, _ in oldest:
                waits.hget(b"memq:job:" + job_id, "waiting")
            waiting = sum(1 for w in (waits.execute() if oldest else []) if w)
        except (redis.RedisError, OSError) as exc:
            logger.warning("metrics: Redis unreachable (%s); backlog gauges skipped", type(exc).__name__)
            return
        depth = GaugeMetricFamily("memq_queue_depth", "Messages ready in each memq queue.", labels=["queue"])
        for queue, n in zip(Queues.ALL, lengths):
            depth.add_metric([queue], float(n))
        yield depth
        head = GaugeMetricFamily("memq_queue_oldest_job_seconds", "Age of the job whose message is next out of "
                                 "each queue (0 when the queue is empty).", labels=["queue"])
        for queue, seconds in zip(Queues.ALL, ages):
            head.add_metric([queue], seconds)
        yield head
        yield GaugeMetricFamily("memq_unfinished_jobs", "Jobs accepted and not finished.", value=float(live))
        age = time.time() - float(oldest[0][1]) if oldest else 0.0
        yield GaugeMetricFamily("memq_oldest_unfinished_job_seconds", "Age of the oldest unfinished job.",
                                value=max(0.0, age))
        yield GaugeMetricFamily("memq_jobs_waiting_for_scope", "Unfinished jobs waiting for an earlier job of "
                                f"their scope (over the oldest {SAMPLE}).", value=float(waiting))


def _job_of(raw: bytes | None) -> str | None:
    """The job id a memq task message carries (its only argument), or None."""
    if raw is None:
        return None
    try:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        return str(body[0][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not one of memq's messages (the poison handling deals with those)

"""Small helpers shared by tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from memq.models import JobStatus, Receipt


def wait_done(producer: Any, receipt: Receipt, timeout_s: float = 90.0) -> JobStatus:
    """Follow one job to succeeded/failed and return its status (fails the test on timeout)."""
    status: JobStatus = producer.wait([receipt], timeout_s=timeout_s, poll_s=0.05)[0]
    assert status.done, f"job {receipt.job_id} still {status.status} after {timeout_s} s"
    return status


def facts_reply(*facts: str | tuple[str, list[int]]) -> str:
    """A scripted extraction reply."""
    items = [{"text": f, "sources": [0]} if isinstance(f, str) else {"text": f[0], "sources": f[1]} for f in facts]
    return json.dumps({"facts": items})


def decisions_reply(*decisions: dict[str, Any]) -> str:
    """A scripted decision reply."""
    return json.dumps({"memory": list(decisions)})


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` every 50 ms until it holds; fail the test after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def json_input(prompt: str) -> dict[str, Any]:
    """The JSON object of one of memq's user prompts (``"Input:\n{...}"``)."""
    data: dict[str, Any] = json.loads(prompt[prompt.index("{"):])
    return data


@contextmanager
def quiet_producer(redis_url: str, **settings: Any) -> Iterator[tuple[Any, Any]]:
    """A producer on Redis database 3 of `redis_url`, which no worker reads (Redis only: no worker,
    no model), and a client to inspect it; the database is emptied before and after."""
    import redis

    from memq.config import RedisSettings, Settings
    from producer import Producer

    url = redis_url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    producer = Producer(Settings(redis=RedisSettings(url=url), **settings))
    try:
        yield producer, client
    finally:
        producer.close()
        client.flushdb()
        client.close()


def locomo_sessions(user_id: str, conversation: str, count: int) -> list[dict[str, Any]]:
    """The first `count` sessions of a LoCoMo conversation as add requests of `user_id`, each with its
    own idempotency key."""
    from producer.backfill import read_locomo
    from tests.conftest import LOCOMO

    return [{**i.request, "user_id": user_id, "idempotency_key": f"{conversation}:{i.session_id}"}
            for i in read_locomo(LOCOMO, conversations=[conversation])[:count]]


PARKED = "memq.parked-by-hand"
"""A queue no worker reads: the task messages of jobs a test moves by hand (`by_hand_clients`)."""


def by_hand_clients(settings: Any) -> Any:
    """`jobs.clients.build_clients(settings)` with a ledger whose every task message goes to `PARKED`, so
    nothing but the test moves its jobs: enqueue them with ``c.ledger.jobs.enqueue``, run each stage of
    `jobs.add` and commit its transition with ``c.ledger.commit``. Delete `PARKED` afterwards."""
    import dataclasses

    from broker.jobstore import JobStore
    from broker.messages import TaskMessages
    from jobs.clients import build_clients
    from jobs.ledger import JobLedger
    from memq.config import Queues

    c = build_clients(settings)
    parked = JobStore(c.ledger.jobs.client, ttl_s=settings.jobs.ttl_s,
                      messages=TaskMessages(routes={task: PARKED for task in Queues.ROUTES}))
    return dataclasses.replace(c, ledger=JobLedger(parked, c.ledger.records, c.ledger.history))

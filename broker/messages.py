"""Celery task messages built without a broker connection, so they can be pushed by a Lua script.

The message is Celery's protocol 2 (the headers `Celery.amqp.as_task_v2` makes) wrapped in kombu's
Redis transport envelope (JSON with a base64 body): the same bytes ``apply_async`` would ``LPUSH``.
Building them here lets memq push a job's next step in the same atomic Redis script that records the
step (see `broker.jobstore`), so a step is never recorded without its successor being queued, nor
queued twice. Tasks are named, never imported: neither the producer nor this module loads worker code.

A countdown becomes Celery's ``eta`` header (ISO-8601, UTC): the worker holds such a message until
then, as it does for ``apply_async(countdown=...)``.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic_core import to_json

from memq.config import Queues

START_TASK = "memq.start"
"""The task that starts a job (defined in `workers.tasks`)."""

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
_TAG_PREFIX = uuid.uuid4().hex[:20] + "."
_tags = itertools.count()


def _new_tag_prefix() -> None:
    global _TAG_PREFIX, _tags
    _TAG_PREFIX, _tags = uuid.uuid4().hex[:20] + ".", itertools.count()


os.register_at_fork(after_in_child=_new_tag_prefix)  # a forked worker child must not reuse its parent's tags


def _delivery_tag() -> str:
    """A delivery tag unique across processes (a random per-process prefix, renewed in forked children,
    and a counter): kombu keys unacknowledged messages by it. Cheaper than a uuid4 per message."""
    return f"{_TAG_PREFIX}{next(_tags):x}"


def start_task_id(job_id: str) -> str:
    """The Celery task id of a job's start task: the job id itself (so Flower shows the job's id, every
    later task of the job names it as ``root_id``, and a redelivery keeps it)."""
    return job_id


@dataclass(frozen=True)
class Next:
    """A task to run for a job: the name of a memq task and its countdown.

    Attributes:
        task: the task name (``"memq.extract"``); its queue comes from `memq.config.Queues.ROUTES`.
        countdown_s: seconds before it may run (0: at once).
        retries: Celery's ``retries`` header: the attempt number of this stage (0 for a first try;
            requeues that are not attempts keep the current number).
    """

    task: str
    countdown_s: float = 0.0
    retries: int = 0

    @property
    def queue(self) -> str:
        """The Celery queue (Redis list) the task goes to."""
        return Queues.ROUTES[self.task]


class TaskMessages:
    """Serializes the messages of memq's tasks, each carrying only the job id as its argument.

    Args:
        routes: task name -> queue, overriding `Queues.ROUTES` (operators' tools and tests that park
            a task in a queue no worker reads).
    """

    def __init__(self, routes: dict[str, str] | None = None) -> None:
        self._routes = {**Queues.ROUTES, **(routes or {})}

    def queue(self, step: Next) -> str:
        """The queue `step` goes to."""
        return self._routes[step.task]

    def build(self, job_id: str, step: Next, *, parent_id: str | None = None) -> bytes:
        """Serialize the message that runs `step` for `job_id`.

        Args:
            job_id: the job; the only argument the task gets (the request stays in Redis).
            step: task name, countdown (seconds) and attempt number.
            parent_id: the Celery id of the task that sends it (Flower links them).

        Returns:
            The message as UTF-8 JSON bytes, ready to ``LPUSH`` onto `queue(step)`.
        """
        start_id = start_task_id(job_id)
        task_id = start_id if step.task == START_TASK and not step.retries else str(uuid.uuid4())
        eta = (datetime.now(timezone.utc) + timedelta(seconds=step.countdown_s)).isoformat() \
            if step.countdown_s > 0 else None
        headers: dict[str, Any] = {
            "lang": "py", "task": step.task, "id": task_id, "shadow": None, "eta": eta, "expires": None,
            "group": None, "group_index": None, "retries": step.retries, "timelimit": [None, None],
            "root_id": start_id, "parent_id": parent_id, "argsrepr": repr((job_id,)), "kwargsrepr": "{}",
            "origin": _ORIGIN, "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
        }
        body = to_json([[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
        envelope = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue(step)},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": _delivery_tag(),
            },
        }
        return to_json(envelope)

    def start(self, job_id: str) -> tuple[str, bytes]:
        """The queue and message that start `job_id` (what the producer pushes)."""
        step = Next(START_TASK)
        return self.queue(step), self.build(job_id, step)

"""Celery task messages built without a broker connection, so a batch can be pushed in one script.

The message is Celery's protocol 2 (headers from `Celery.amqp.as_task_v2`) wrapped in kombu's Redis
transport envelope (JSON with a base64 body), the same bytes `apply_async` would ``LPUSH``. Tasks are
named, never imported: the producer never loads worker code.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid

from celery import Celery

START_TASK = "memq.start"
"""The task that expands a job into its chain of stages (defined in `workers.tasks`)."""

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def start_task_id(job_id: str) -> str:
    """The Celery task id of a job's start task (deterministic, so redelivery keeps it)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"memq:{job_id}:start"))


def start_message(app: Celery, job_id: str, queue: str) -> bytes:
    """Serialize the message that starts `job_id`.

    Args:
        app: a Celery app (used only to build protocol-2 headers; no connection is made).
        job_id: the job; the only argument the task gets (the request stays in Redis).
        queue: the Celery queue (Redis list) the message goes to.

    Returns:
        The message as UTF-8 JSON bytes, ready to ``LPUSH`` onto `queue`.
    """
    task_id = start_task_id(job_id)
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id, START_TASK, args=(job_id,), kwargs={}, origin=_ORIGIN
    )
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()

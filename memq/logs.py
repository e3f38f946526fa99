"""Structured logs: one JSON object per line, with the job, stage and scope a record belongs to.

A worker sets the context when a task starts (`task_context`) and the ledger adds the scope key when it
reads the job's record (`set_scope_key`); `JsonFormatter` puts them on every record logged meanwhile in
that thread. ``MEMQ_LOG__FORMAT=json`` turns it on for workers (`workers.app`). memq's own log messages
name ids, stages, counts and error classes, never message or memory text (tests/test_privacy.py).
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("memq_job_id", default=None)
_stage: contextvars.ContextVar[str | None] = contextvars.ContextVar("memq_stage", default=None)
_scope_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("memq_scope_key", default=None)


@contextmanager
def task_context(job_id: str, stage: str) -> Iterator[None]:
    """Attach `job_id` and `stage` (and, once the ledger sets it, the scope key) to records logged inside."""
    tokens = (_job_id.set(job_id), _stage.set(stage), _scope_key.set(None))
    try:
        yield
    finally:
        for var, token in zip((_job_id, _stage, _scope_key), tokens):
            var.reset(token)


def set_scope_key(scope_key: str) -> None:
    """Record the current job's scope key (`memq.models.Scope.key`) for the rest of its task."""
    if _job_id.get() is not None:
        _scope_key.set(scope_key)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ``{"ts", "level", "logger", "message", "job_id", "stage",
    "scope_key", "process", "thread"}`` (context keys only when set; ``exc_type`` when an exception
    is attached: its class only, as a third-party message may quote user data)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (UTC ISO-8601 time)."""
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process, "thread": record.threadName,
        }
        for key, var in (("job_id", _job_id), ("stage", _stage), ("scope_key", _scope_key)):
            value = var.get()
            if value is not None:
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
        return json.dumps(line, ensure_ascii=False, default=str)

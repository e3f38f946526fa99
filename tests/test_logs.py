"""Structured logs: a job's records carry its id, stage and scope key, and never its text."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from memq.logs import JsonFormatter
from memq.models import Scope
from tests.helpers import wait_done


def test_a_jobs_log_lines_are_json_with_job_stage_and_scope_and_no_user_text(producer: Any, user_id: str) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    watched = [logging.getLogger(name) for name in ("jobs", "workers", "pipeline")]
    levels = [lg.level for lg in watched]
    for lg in watched:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        # When a job runs through the session worker
        marker = "Zebra-Quartz-7781 is my locker code."
        status = wait_done(producer, producer.add(marker, user_id=user_id, agent_id="a&b=c"))
    finally:
        for lg, level in zip(watched, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [line for line in lines if line.get("job_id") == status.job_id]
    # Then its end is logged as JSON with the job, the stage and the scope key (ids, percent-encoded)
    done = [line for line in mine if "succeeded" in line["message"]]
    assert done and done[0]["stage"] == "finalize" and done[0]["level"] == "INFO"
    assert done[0]["scope_key"] == Scope(user_id=user_id, agent_id="a&b=c").key()
    assert {"ts", "logger", "process", "thread"} <= set(done[0])
    # And no line holds the message's text
    assert not any("Zebra-Quartz" in json.dumps(line) for line in lines)

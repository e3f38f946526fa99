"""No user or memory text where operators look: a marker sent through failing and succeeding jobs is
searched in the broker's messages, the result backend, Flower's API, the job records' and dead
letters' error columns, and the worker's log at INFO."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.redis_server import RedisServer, free_port
from memq.config import RedisSettings, Settings
from memq.models import JobState
from producer import Producer
from tests.rigs.llm_server import LLMTestServer, Reply
from tests.rigs.workers import start_worker, stop_worker, wait_ready, worker_env

pytestmark = pytest.mark.faults

MARKER = "zebra-" + uuid.uuid4().hex[:10]
"""A string that only the user's messages (and so memories and prompts) contain."""

BY_DESIGN = (":request", ":stage:")
"""Job keys that hold user data on purpose: the stored request (claim check) and stage outputs."""


@pytest.fixture()
def flower(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[str, str]]:
    """Flower on its own Redis database, with its HTTP API open (as `compose/` runs it behind a proxy)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    env = {**os.environ, "MEMQ_REDIS__URL": url, "FLOWER_UNAUTHENTICATED_API": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}",
                             "--address=127.0.0.1"], env=env, stdout=open(tmp_path / "flower.log", "wb"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "flower.log").read_text()[-2000:]) from None
            time.sleep(0.2)
    yield url, base
    proc.terminate()
    proc.wait(30)


@pytest.mark.timeout(240)
def test_a_marker_in_the_messages_never_reaches_logs_errors_task_results_or_flower(
        flower: tuple[str, str], tmp_path: Path, llm_server: LLMTestServer, settings: Settings) -> None:
    url, base = flower
    data = tmp_path / "data"
    log = tmp_path / "worker.log"
    env = worker_env(url, data, MEMQ_LLM__MODEL="openai/test-model", MEMQ_LLM__API_BASE=llm_server.url,
                     MEMQ_LLM__API_KEY="test-key", MEMQ_JOBS__RETRY_BACKOFF_MAX_S="1")
    worker = start_worker(env, log)
    producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=url)}))
    try:
        wait_ready(worker, log)
        # Given replies that quote the user's words: unparseable, a provider 400 whose body quotes
        # the prompt, a 500 that does the same before an answer that works
        quoted = f"You said: I hide my key under the {MARKER} mat."
        llm_server.script(Reply(content=quoted),
                          Reply(status=400, raw_body=json.dumps({"error": {"message": quoted}}).encode()),
                          Reply(status=500, raw_body=json.dumps({"error": {"message": quoted}}).encode()),
                          json.dumps({"facts": [{"text": f"Ann hides her key under the {MARKER} mat", "sources": [0]}]}))
        receipts = [producer.add(f"I hide my key under the {MARKER} mat.", user_id=f"ann-{i}") for i in range(3)]
        statuses = producer.wait(receipts, timeout_s=120, poll_s=0.2)
        # Then two jobs failed and one succeeded (its memory holds the marker, where it belongs)
        assert sorted(s.status.value for s in statuses) == ["failed", "failed", "succeeded"], statuses
        assert any(MARKER in r.memory for s in statuses for r in s.results)
        deadline = time.monotonic() + 30
        while True:  # Flower takes in task events as they come: wait until it has seen both failures
            tasks = urllib.request.urlopen(base + "/api/tasks", timeout=10).read().decode()
            if tasks.count('"FAILURE"') >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        stop_worker(worker)
        producer.close()
    # Flower saw the failures, without the marker
    assert "JobFailed" in tasks and MARKER not in tasks
    # The worker's log (INFO and above) never has it
    assert "failed in memq.extract" in log.read_text() and MARKER not in log.read_text(errors="replace")
    # Nor the broker's queues, unacked messages, result backend keys or the job records' error fields
    client = redis.Redis.from_url(url)
    for key in client.scan_iter():
        name = key.decode()
        if any(part in name for part in BY_DESIGN):
            continue
        kind = client.type(key).decode()
        if kind == "hash":
            values = {k.decode(): v for k, v in client.hgetall(key).items() if k != b"results"}
            blob = b"".join(values.values())
        elif kind == "list":
            blob = b"".join(client.lrange(key, 0, -1))
        elif kind == "string":
            blob = client.get(key) or b""
        else:
            continue
        assert MARKER.encode() not in blob, name
    client.flushdb()
    # Nor the SQL error columns of job records and dead letters
    db = sqlite3.connect(data / "history.db")
    errors = db.execute("SELECT coalesce(error, '') FROM jobs UNION ALL SELECT error FROM dead_letters").fetchall()
    assert len(errors) >= 3 and not any(MARKER in e for (e,) in errors)
    assert {t for (t,) in db.execute("SELECT error_type FROM dead_letters")} == {"LLMOutputError", "InvalidJob"}
    db.close()
    assert all(s.status is not JobState.PARTIAL for s in statuses)

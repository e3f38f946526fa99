"""Faults with real processes: Redis restarted under load, a worker that cannot own its stores, a job
that waited longer than the records' TTL. Each test runs its own redis-server and `memq worker`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.redis_server import RedisServer
from memq.config import RedisSettings, Settings
from memq.models import JobState, JobStatus
from producer import Producer
from tests.conftest import requires_locomo
from tests.helpers import locomo_sessions, until
from tests.rigs.workers import start_worker, stop_worker, wait_ready, worker_env

pytestmark = pytest.mark.faults


def _memory_texts(data_dir: Path, user_id: str) -> list[str]:
    """The memories of a scope, read in a fresh process once the worker has released the folder."""
    code = ("import json; from memq.config import Settings; from pathlib import Path; from memq.models import Scope;"
            "from stores.vector_open import open_vector_store;"
            f"v = open_vector_store(Settings(data_dir=Path({str(data_dir)!r})).qdrant, 384);"
            f"print(json.dumps(sorted(m.memory for m in v.list(Scope(user_id={user_id!r}), limit=10000))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    texts: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return texts


@pytest.fixture()
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with AOF on (as production runs it), restartable on the same port and data."""
    with RedisServer(appendonly=True, data_dir=tmp_path / "redis") as server:
        yield server


def _producer(settings: Settings, url: str) -> Producer:
    return Producer(settings.model_copy(update={"redis": RedisSettings(url=url, socket_timeout_s=1)}))


@requires_locomo
@pytest.mark.timeout(600)
def test_redis_restarted_three_times_during_a_backfill_every_job_succeeds_exactly_once(
        aof_redis: RedisServer, tmp_path: Path, settings: Settings) -> None:
    log = tmp_path / "worker.log"
    env = worker_env(aof_redis.url, tmp_path / "data", MEMQ_REDIS__VISIBILITY_TIMEOUT_S="20")
    producer = _producer(settings, aof_redis.url)
    worker = start_worker(env, log)
    try:
        wait_ready(worker, log)
        # Given a 20-job backfill of two conversations (two scopes, each in order)
        receipts = producer.add_many(locomo_sessions("restarts-a", "conv-26", 10) + locomo_sessions("restarts-b", "conv-30", 10))

        def done() -> int:
            return sum(s.done for s in producer.wait(receipts, timeout_s=0))

        # When Redis is restarted three times while jobs run (AOF on, a few seconds down each time)
        for target in (3, 8, 13):
            until(lambda: done() >= target, 240, f"{target} jobs done")
            aof_redis.stop()
            time.sleep(3)  # the outage itself
            aof_redis.start()
        # Then every job ends succeeded
        statuses: list[JobStatus] = producer.wait(receipts, timeout_s=300, poll_s=0.2)
        assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 20, \
            [(s.status, s.stage, s.error_type, s.waiting) for s in statuses if s.status is not JobState.SUCCEEDED]
        # And each exactly once: one outcome per job in the worker's log
        text = log.read_text(errors="replace")
        counts = {r.job_id: text.count(f"job {r.job_id} succeeded") for r in receipts}
        assert set(counts.values()) == {1}, counts
        # And the same sessions undisturbed leave the same memories (nothing duplicated or lost)
        calm = producer.add_many(locomo_sessions("calm-a", "conv-26", 10) + locomo_sessions("calm-b", "conv-30", 10))
        assert all(s.status is JobState.SUCCEEDED for s in producer.wait(calm, timeout_s=300, poll_s=0.2))
    finally:
        stop_worker(worker)
    for disturbed, undisturbed in (("restarts-a", "calm-a"), ("restarts-b", "calm-b")):
        texts = _memory_texts(tmp_path / "data", disturbed)
        assert texts and texts == _memory_texts(tmp_path / "data", undisturbed)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
@pytest.mark.timeout(180)
def test_a_worker_that_cannot_own_the_embedded_store_refuses_to_start_and_takes_no_job(
        tmp_path: Path, redis_server: RedisServer, settings: Settings, pool: str) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    data = tmp_path / "data"
    # Given a process that owns the embedded Qdrant folder
    code = ("import sys; from memq.config import Settings; from pathlib import Path;"
            "from stores.vector_open import open_vector_store;"
            f"open_vector_store(Settings(data_dir=Path({str(data)!r})).qdrant, 384).ensure_collection();"
            "print('owned', flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "owned"
        # And a job waiting in the queue
        producer = _producer(settings, url)
        receipt = producer.add("I grow tomatoes.", user_id="u", infer=False)
        # When a worker starts on the same folder
        log = tmp_path / "worker.log"
        worker = start_worker(worker_env(url, data), log, pool=pool)
        returncode = worker.wait(120)
        # Then it stops with an error naming the folder and its owner, before consuming anything
        text = log.read_text(errors="replace")
        assert returncode != 0, text[-2000:]
        assert str(data / "qdrant") in text and f"process {owner.pid}" in text
        assert " ready." not in text
        assert producer.status(receipt.job_id, user_id="u").status is JobState.QUEUED
        assert client.llen("memq.light") == 1 and client.hlen("unacked") == 0
    finally:
        owner.kill()
        owner.wait()
        client.flushdb()
        client.close()

"""Lost task messages: a job whose next message a killed worker took with it (kombu's Redis transport
records a message as held only after BRPOP has removed it from its queue) is found and queued again,
then ended with a dead letter if it keeps being lost. Real Redis, a real SQLite ledger, and a real worker
process for the end-to-end case; the lost message is taken with RPOP, as the killed worker's BRPOP did."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.jobstore import JobStore
from broker.lost import UNACKED_INDEX_KEY, UNACKED_KEY, LostJobs
from cli.redis_server import RedisServer
from jobs.ledger import JobLedger
from jobs.rescue import Sweeper
from memq.config import Queues, RedisSettings, Settings
from memq.models import JobState
from producer import Producer
from stores.history import open_history_store, sql_engine
from stores.records import RecordStore
from tests.rigs.workers import start_worker, stop_worker, worker_env


@pytest.fixture()
def lone_redis(redis_server: RedisServer) -> Iterator[str]:
    """A database of the test Redis that no worker reads, emptied before and after."""
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@dataclass(frozen=True)
class Rig:
    """A ledger (Redis database no worker reads, SQLite), its Redis client and a producer on it."""

    ledger: JobLedger
    client: redis.Redis
    producer: Producer


@pytest.fixture()
def rig(lone_redis: str, settings: Settings, tmp_path: Path) -> Rig:
    sql = f"sqlite:///{tmp_path / 'history.db'}"
    ledger = JobLedger(JobStore.from_url(lone_redis, ttl_s=3600), RecordStore(sql_engine(sql)), open_history_store(sql))
    return Rig(ledger, ledger.jobs.client, Producer(settings.model_copy(update={"redis": RedisSettings(url=lone_redis)})))


def _take(client: redis.Redis, queue: str) -> dict[str, Any]:
    """What a worker killed right after its BRPOP leaves: the message gone from its queue, held nowhere."""
    raw = client.rpop(queue)
    assert isinstance(raw, bytes)
    message: dict[str, Any] = json.loads(raw)
    return message


def test_a_lost_start_message_is_queued_again_once_and_a_held_or_queued_one_never(
        rig: Rig) -> None:
    ledger, client, producer = rig.ledger, rig.client, rig.producer
    lost_jobs = LostJobs(client)
    sweeper = Sweeper(ledger, quiet_s=0, most=3, held_for_s=60, confirm_s=0)
    # Given a job whose start message waits in its queue
    receipt = producer.add("I keep bees on the roof.", user_id="rescue-a", infer=False)
    # Then it is not lost
    assert lost_jobs.find(quiet_s=0, confirm_s=0) == []
    # When a worker takes the message and holds it (kombu's unacked hash), Then it is still not lost
    message = _take(client, Queues.LIGHT)
    assert message["headers"]["root_id"] == receipt.job_id
    tag = message["properties"]["delivery_tag"]
    client.hset(UNACKED_KEY, tag, json.dumps([message, "", Queues.LIGHT]))
    client.zadd(UNACKED_INDEX_KEY, {tag: time.time()})
    assert sweeper.sweep() == {}
    # When the worker dies before recording it (held nowhere)
    client.delete(UNACKED_KEY, UNACKED_INDEX_KEY)
    # Then the sweep queues the same task again, as a new message at the head of its queue, once
    assert sweeper.sweep() == {receipt.job_id: "rescued"}
    [again] = [json.loads(m) for m in client.lrange(Queues.LIGHT, 0, -1)]
    assert (again["headers"]["task"], again["headers"]["root_id"]) == ("memq.start", receipt.job_id)
    assert again["properties"]["delivery_tag"] != message["properties"]["delivery_tag"]
    assert sweeper.sweep() == {}
    assert client.hget(f"memq:job:{receipt.job_id}", "rescues") == b"1"


def test_a_message_held_far_longer_than_the_visibility_timeout_allows_counts_as_lost(
        rig: Rig) -> None:
    ledger, client, producer = rig.ledger, rig.client, rig.producer
    receipt = producer.add("I keep bees on the roof.", user_id="rescue-e", infer=False)
    # Given the job's message held by a dead worker whose held messages kombu never brought back
    message = _take(client, Queues.LIGHT)
    tag = message["properties"]["delivery_tag"]
    client.hset(UNACKED_KEY, tag, json.dumps([message, "", Queues.LIGHT]))
    client.zadd(UNACKED_INDEX_KEY, {tag: time.time() - 100})
    # Then it counts as held for up to held_for_s, and as lost after that
    assert Sweeper(ledger, quiet_s=0, most=3, held_for_s=200, confirm_s=0).sweep() == {}
    assert Sweeper(ledger, quiet_s=0, most=3, held_for_s=50, confirm_s=0).sweep() == {receipt.job_id: "rescued"}


def test_a_job_that_changed_since_it_was_found_lost_is_left_alone(
        rig: Rig) -> None:
    ledger, client, producer = rig.ledger, rig.client, rig.producer
    receipt = producer.add("I keep bees on the roof.", user_id="rescue-b", infer=False)
    _take(client, Queues.LIGHT)
    [lost] = LostJobs(client).find(quiet_s=0, confirm_s=0)
    # When the job moves on before the rescue runs (a late worker recorded its step)
    from broker.messages import Next

    assert ledger.jobs.retry(receipt.job_id, step=Next("memq.start")) == "ok"
    # Then the rescue queues nothing
    assert ledger.jobs.rescue(lost.job_id, touched=lost.touched, steps=lost.next, most=3) == "moved"
    assert client.llen(Queues.LIGHT) == 1


def test_a_rescue_followed_by_progress_does_not_count_toward_the_limit_and_a_countdown_is_kept(rig: Rig) -> None:
    from broker.messages import Next

    ledger, client, producer = rig.ledger, rig.client, rig.producer
    sweeper = Sweeper(ledger, quiet_s=0, most=1, confirm_s=0)
    receipt = producer.add("I fly kites.", user_id="rescue-f", infer=False)
    # Given a job rescued once, that then made progress (a retry with a 2-minute countdown), then was lost again
    _take(client, Queues.LIGHT)
    assert sweeper.sweep() == {receipt.job_id: "rescued"}
    _take(client, Queues.LIGHT)
    assert ledger.jobs.retry(receipt.job_id, step=Next("memq.start", countdown_s=120)) == "ok"
    _take(client, Queues.LIGHT)
    # Then it is rescued again rather than failed, and its message keeps what is left of the countdown
    assert sweeper.sweep() == {receipt.job_id: "rescued"}
    eta = _take(client, Queues.LIGHT)["headers"]["eta"]
    assert eta is not None and 100 < (datetime.fromisoformat(eta) - datetime.now(timezone.utc)).total_seconds() <= 120


def test_a_job_lost_more_often_than_allowed_ends_failed_with_a_dead_letter_and_its_scope_moves_on(
        rig: Rig) -> None:
    ledger, client, producer = rig.ledger, rig.client, rig.producer
    sweeper = Sweeper(ledger, quiet_s=0, most=1, confirm_s=0)
    first, second = (producer.add(t, user_id="rescue-c", infer=False) for t in ("I fly kites.", "I sail boats."))
    # Given the first job of a scope rescued once already, then lost again
    _take(client, Queues.LIGHT)
    assert sweeper.sweep() == {first.job_id: "rescued"}
    assert _take(client, Queues.LIGHT)["headers"]["root_id"] == first.job_id
    # When the sweep finds it lost again
    assert sweeper.sweep() == {first.job_id: "failed"}
    # Then it failed with MessageLost and a dead letter to replay, and the next job of its scope has its turn
    status = ledger.jobs.status(first.job_id)
    assert (status.status, status.error_type) == (JobState.FAILED, "MessageLost")
    assert ledger.records.dead_letter_of(first.job_id) is not None
    assert ledger.jobs.meta(second.job_id).turn
    assert client.zscore("memq:jobs:touched", first.job_id) is None


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_a_worker_killed_between_taking_and_recording_a_message_loses_no_job(
        redis_server: RedisServer, tmp_path: Path, settings: Settings) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/10"
    env = worker_env(url, tmp_path / "data", MEMQ_JOBS__RESCUE_AFTER_S="2", MEMQ_JOBS__RESCUE_EVERY_S="0.5")
    producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=url)}))
    client = producer._jobs.client
    client.flushdb()
    # Given two adds of one scope, and the first one's start message taken by a worker that then died
    receipts = producer.add_many([{"messages": t, "user_id": "rescue-d"}
                                  for t in ("My sister Maya lives in Lisbon.", "I moved to Porto in May.")])
    assert _take(client, Queues.LIGHT)["headers"]["root_id"] == receipts[0].job_id
    # When a worker runs
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        statuses = producer.wait(receipts, timeout_s=180, poll_s=0.2)
    finally:
        stop_worker(worker)
    log = (tmp_path / "worker.log").read_text()
    # Then both jobs succeeded, the first after its task was queued again, and each stored its memories
    assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 2, log[-3000:]
    assert f"job {receipts[0].job_id}: its next task message was lost" in log
    assert all(s.results for s in statuses)
    assert statuses[0].updated_at is not None and statuses[1].updated_at is not None
    assert statuses[0].updated_at <= statuses[1].updated_at
    client.flushdb()

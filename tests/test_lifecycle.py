"""An add job's life against the session worker: a finished job stays finished whatever is delivered
again, a job's records do not expire while it lives and any end moves its scope on, stuck jobs are
seen and ended or restarted, and an enqueue that timed out is retried safely with its key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from broker.jobstore import JobStore
from broker.messages import Next, TaskMessages
from cli.redis_server import RedisServer
from memq.config import RedisSettings, Settings
from memq.errors import BrokerUnavailable
from memq.models import JobState, Receipt
from producer import Producer
from tests.helpers import until, wait_done
from tests.rigs.llm_server import LLMTestServer

STAGES = ("memq.start", "memq.caption", "memq.extract", "memq.decide", "memq.write_vectors", "memq.write_graph",
          "memq.finalize")
PARKED = "memq.parked"
"""A queue no worker reads: a start message pushed there keeps its job queued (and its scope held)."""


def _asleep(client: redis.Redis) -> bool:
    """True when Redis does not answer a PING within the client's (short) socket timeout."""
    try:
        client.ping()
        return False
    except redis.TimeoutError:
        client.connection_pool.disconnect()
        return True


def _consumed(client: redis.Redis, tags: list[str]) -> bool:
    """True once every message with these delivery tags was taken from its queue and acknowledged."""
    queued = b"".join(b for q in ("memq.light", "memq.llm", "memq.write") for b in client.lrange(q, 0, -1))
    unacked = {k.decode() for k in client.hkeys("unacked")}
    return not any(t.encode() in queued or t in unacked for t in tags)


def _push_stages(client: redis.Redis, job_id: str) -> list[str]:
    """Deliver every stage of a job again (as a Redis restore would); returns their delivery tags."""
    messages = TaskMessages()
    tags = []
    for task in STAGES:
        step = Next(task)
        raw = messages.build(job_id, step)
        tags.append(json.loads(raw)["properties"]["delivery_tag"])
        client.lpush(messages.queue(step), raw)
    return tags


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
def test_a_redelivered_stage_of_a_finished_job_changes_nothing(producer: Producer, memories: Any, user_id: str,
                                                               llm_server: LLMTestServer, outcome: str) -> None:
    from tests.rigs.llm_server import Reply

    if outcome == "failed":
        llm_server.script(Reply(content="not JSON at all"))
    receipt = producer.add("I keep bees on my roof.", user_id=user_id)
    before = wait_done(producer, receipt)
    assert before.status.value == outcome
    stored = memories.get_all(user_id=user_id)["results"]
    calls = llm_server.calls
    client = producer._jobs.client
    # When every stage of the finished job is delivered again
    tags = _push_stages(client, receipt.job_id)
    until(lambda: _consumed(client, tags), 60, "the redelivered stages to be consumed")
    # Then the job is unchanged (status, stage, time, events), no model was called, and memories are the same
    assert producer.status(receipt.job_id, user_id=user_id) == before
    assert llm_server.calls == calls
    assert memories.get_all(user_id=user_id)["results"] == stored


def test_a_redelivered_edit_changes_nothing_twice_and_never_undoes_a_later_one(producer: Producer, client: Any,
                                                                              user_id: str) -> None:
    [kept, doomed] = client.add([{"role": "user", "content": "I paint."}, {"role": "user", "content": "I sing."}],
                                user_id=user_id, infer=False)["results"]
    first = wait_done(producer, client.update(kept["id"], "I paint in oils.", user_id=user_id, wait=False))
    client.update(kept["id"], "I paint in watercolours.", user_id=user_id)
    gone = wait_done(producer, client.delete(doomed["id"], user_id=user_id, wait=False))
    history = {m: client.history(m, user_id=user_id) for m in (kept["id"], doomed["id"])}
    pushed = producer._jobs.client
    # When every stage of the first update and of the delete is delivered again
    tags = _push_stages(pushed, first.job_id) + _push_stages(pushed, gone.job_id)
    until(lambda: _consumed(pushed, tags), 60, "the redelivered stages to be consumed")
    # Then both jobs are unchanged, the later update stands, and no history row was added
    assert producer.status(first.job_id, user_id=user_id) == first
    assert producer.status(gone.job_id, user_id=user_id) == gone
    assert client.get(kept["id"], user_id=user_id)["memory"] == "I paint in watercolours."
    assert client.get(doomed["id"], user_id=user_id) is None
    assert {m: client.history(m, user_id=user_id) for m in history} == history
    assert [h["event"] for h in history[kept["id"]]] == ["ADD", "UPDATE", "UPDATE"]


def test_a_live_jobs_records_never_expire_and_any_end_moves_its_scope_on(producer: Producer, user_id: str,
                                                                        settings: Settings) -> None:
    client = producer._jobs.client
    parked = JobStore(client, ttl_s=settings.jobs.ttl_s, messages=TaskMessages(routes={"memq.start": PARKED}))
    # Given a job whose start is parked (it stays queued, holding its scope) and a later job of the scope
    first = producer.build("I collect old maps.", user_id=user_id)
    [(first_id, _)] = parked.enqueue([first])
    second = producer.add("I collect old coins too.", user_id=user_id)
    # Then the live records have no TTL (they cannot expire while the job waits), and the later job waits
    for key in (f"memq:job:{first_id}", f"memq:job:{first_id}:request"):
        assert client.ttl(key) == -1
    waiting = producer.wait_for(second, lambda s: s.waiting is not None, timeout_s=30)
    assert waiting.waiting is not None and first_id in waiting.waiting
    # When the first job's request is lost and its start is delivered, it fails ...
    client.delete(f"memq:job:{first_id}:request")
    client.lmove(PARKED, "memq.light", "RIGHT", "LEFT")
    first_receipt = Receipt(job_id=first_id, scope=first.scope)
    assert producer.wait_for(first_receipt, lambda s: s.done, timeout_s=30).status is JobState.FAILED
    # ... and its scope moves on: the later job succeeds, and its finished records now expire
    assert wait_done(producer, second).status is JobState.SUCCEEDED
    assert 0 < client.ttl(f"memq:job:{second.job_id}") <= settings.jobs.ttl_s


def _memq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)


def test_a_stuck_job_is_listed_with_its_age_and_can_be_ended_or_restarted(producer: Producer, user_id: str,
                                                                          settings: Settings) -> None:
    client = producer._jobs.client
    parked = JobStore(client, ttl_s=settings.jobs.ttl_s, messages=TaskMessages(routes={"memq.start": PARKED}))
    # Given a stuck job (its start message lost) and a later job of its scope waiting behind it
    [(stuck_id, _)] = parked.enqueue([producer.build("I fly kites on Sundays.", user_id=user_id)])
    client.delete(PARKED)
    later = producer.add("I fly kites with my niece.", user_id=user_id)
    producer.wait_for(later, lambda s: s.waiting is not None, timeout_s=30)
    # When an operator lists jobs, Then both show up with their state, age and what the later one waits for
    rows = {r["job_id"]: r for r in map(json.loads, _memq("jobs", "list", "--json").stdout.splitlines())}
    assert rows[stuck_id]["status"] == "queued" and rows[stuck_id]["age_s"] >= 0
    assert rows[later.job_id]["status"] == "running" and stuck_id in rows[later.job_id]["waiting"]
    # When the operator ends the stuck job, Then it fails (with a dead letter) and the later job goes on
    assert _memq("jobs", "fail", stuck_id).returncode == 0
    assert wait_done(producer, later).status is JobState.SUCCEEDED
    stuck = Receipt(job_id=stuck_id, scope=later.scope)
    assert producer.status(stuck_id, user_id=user_id).error_type == "JobEnded"
    # When the operator restarts it, Then it runs again and succeeds
    assert _memq("jobs", "retry", stuck_id).returncode == 0
    assert wait_done(producer, stuck).status is JobState.SUCCEEDED
    assert "succeeded" in _memq("jobs", "list", "--state", "succeeded", "--limit", "1000").stdout


@pytest.fixture()
def slow_redis() -> Any:
    """A redis-server that accepts DEBUG SLEEP (to be slow, not down)."""
    with RedisServer(debug_command=True) as server:
        yield server


def test_an_enqueue_that_timed_out_is_retried_safely_with_the_same_key(slow_redis: RedisServer,
                                                                      settings: Settings) -> None:
    producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=slow_redis.url, socket_timeout_s=0.3)}))
    client = redis.Redis.from_url(slow_redis.url)
    producer.add("warm up the script cache", user_id="u")
    # Given Redis busy for 1 s, longer than the producer's socket timeout
    busy = redis.Connection(host="127.0.0.1", port=slow_redis.port)
    busy.send_command("DEBUG", "SLEEP", "1")  # the reply is read once it wakes up
    probe = redis.Redis.from_url(slow_redis.url, socket_timeout=0.05)
    until(lambda: _asleep(probe), 5, "Redis to be busy")
    # When an add times out, Then the producer says BrokerUnavailable ...
    with pytest.raises(BrokerUnavailable):
        producer.add("I play the oboe.", user_id="u", idempotency_key="req-42")
    busy.read_response()
    busy.disconnect()
    probe.close()
    # ... although Redis ran the enqueue once it woke up
    assert client.llen("memq.light") == 2
    # When the caller retries with the same key, Then it gets that job back and nothing is enqueued twice
    again = producer.add("I play the oboe.", user_id="u", idempotency_key="req-42")
    assert again.duplicate and client.llen("memq.light") == 2
    assert producer.status(again.job_id, user_id="u").status is JobState.QUEUED
    producer.close()
    client.close()


def test_two_deliveries_of_a_stage_at_once_ask_the_model_once(producer: Producer, settings: Settings, user_id: str,
                                                              llm_server: LLMTestServer) -> None:
    from jobs import add
    from tests.helpers import PARKED as PARKED_BY_HAND, by_hand_clients
    from tests.rigs.llm_server import Reply

    by_hand = by_hand_clients(settings)
    # Given a job taken by hand up to its extraction, and a slow model
    job = producer.build("I sail on the lake every summer.", user_id=user_id)
    [(job_id, _)] = by_hand.ledger.jobs.enqueue([job])
    for life in (add.start, add.caption):
        by_hand.ledger.commit(job_id, life(job_id, by_hand))
    by_hand.ledger.jobs.client.delete(PARKED_BY_HAND)
    llm_server.script(Reply(content=json.dumps({"facts": [{"text": "Lee sails on the lake", "sources": [0]}]}),
                      delay_s=1.5))
    # When its extraction is delivered twice at once (a restored message beside its original)
    client = producer._jobs.client
    for _ in range(2):
        client.lpush("memq.llm", TaskMessages().build(job_id, Next("memq.extract")))
    # Then the model is asked once, and the job goes on to succeed
    assert wait_done(producer, Receipt(job_id=job_id, scope=job.scope)).status is JobState.SUCCEEDED
    assert llm_server.calls == 1

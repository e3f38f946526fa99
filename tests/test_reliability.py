"""Reliability with real processes: order per scope, no duplicates under concurrency, provider faults
ending in success or a dead letter, a worker killed mid-backfill, and a Redis restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from memq.config import RedisSettings, Settings
from memq.errors import BrokerUnavailable
from memq.models import JobState
from tests.rigs.llm_server import LLMTestServer, Reply
from cli.redis_server import RedisServer
from producer import Producer
from producer.backfill import read_locomo
from tests.conftest import LOCOMO, requires_locomo
from tests.helpers import json_input, wait_done
from tests.rigs.workers import start_worker, stop_worker, worker_env


def _last_fact_wins(prompt: str) -> str:
    """A model that keeps each message as a fact and UPDATEs the one existing memory with it."""
    data = json_input(prompt)
    if data["task"] == "extract_facts":
        return json.dumps({"facts": [{"text": m["text"], "sources": [m["index"]]} for m in data["messages"]]})
    existing, fact = data["existing_memories"], data["new_facts"][0]
    if existing:
        return json.dumps({"memory": [{"id": "0", "text": fact, "event": "UPDATE", "old_memory": existing[0]["text"]}]})
    return json.dumps({"memory": [{"id": "n", "text": fact, "event": "ADD"}]})


def test_fifty_concurrent_adds_of_the_same_fact_leave_one_memory(producer: Producer, memories: Any,
                                                                 user_id: str) -> None:
    # When 50 callers add the same fact for one user at the same moment
    with ThreadPoolExecutor(max_workers=10) as pool:
        receipts = list(pool.map(lambda _: producer.add("I am allergic to peanuts.", user_id=user_id), range(50)))
    statuses = producer.wait(receipts, timeout_s=180, poll_s=0.1)
    # Then every job succeeded and exactly one memory exists
    assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 50
    stored = memories.get_all(user_id=user_id)["results"]
    assert len(stored) == 1, [m["memory"] for m in stored]


def test_twenty_sessions_enqueued_at_once_apply_in_session_order(producer: Producer, memories: Any, user_id: str,
                                                                 model: Callable[[Callable[[str], str]], None]) -> None:
    model(_last_fact_wins)
    # Given 20 sessions of one user, each changing the same fact, enqueued in one batch
    texts = [f"Ann's current city is city number {n}." for n in range(1, 21)]
    receipts = producer.add_many([{"messages": t, "user_id": user_id} for t in texts])
    statuses = producer.wait(receipts, timeout_s=180, poll_s=0.1)
    assert all(s.status is JobState.SUCCEEDED for s in statuses)
    # Then the memory holds session 20's fact, and its history went 1 -> 2 -> ... -> 20 in order
    [memory] = memories.get_all(user_id=user_id)["results"]
    assert memory["memory"] == texts[-1]
    history = memories.history(memory["id"], user_id=user_id)
    assert [h["event"] for h in history] == ["ADD"] + ["UPDATE"] * 19
    assert [h["new_memory"] for h in history] == texts


def test_provider_faults_end_every_job_succeeded_or_dead_lettered_and_replay_completes_them(
        producer: Producer, memories: Any, llm_server: LLMTestServer, user_id: str) -> None:
    from jobs.admin import replay_dead_letters
    from jobs.clients import build_clients

    # Given a provider that throttles, then errors, then times out, then answers broken JSON
    llm_server.script(*[Reply(status=429, headers={"Retry-After": "1"})] * 3, *[Reply(status=500)] * 3,
                      *[Reply(delay_s=5.0)] * 2, *[Reply(content='{"facts": [{"text": ')] * 2)
    users = [f"{user_id}-{i}" for i in range(6)]
    receipts = [producer.add(f"I collect stamps from country number {i}.", user_id=u) for i, u in enumerate(users)]
    # Then every job ends succeeded or failed with a dead letter that says why; none is lost
    statuses = producer.wait(receipts, timeout_s=240, poll_s=0.2)
    assert all(s.done for s in statuses), [s.status for s in statuses]
    failed = {s.job_id for s in statuses if s.status is JobState.FAILED}
    clients = build_clients(producer.settings)
    assert clients.records is not None
    letters = {d.job_id: d for d in clients.records.dead_letters()}
    assert failed and failed <= set(letters)
    assert all(letters[j].error_type in ("LLMOutputError", "LLMUnavailable") for j in failed)
    # When the provider has recovered and the dead letters are replayed
    assert sorted(replay_dead_letters(clients.ledger, sorted(failed))) == sorted(failed)
    final = producer.wait(receipts, timeout_s=120, poll_s=0.2)
    # Then every job succeeded, each user has its memory, and the letters are gone
    assert [s.status for s in final] == [JobState.SUCCEEDED] * len(users)
    assert all(memories.get_all(user_id=u)["results"] for u in users)
    assert not failed & {d.job_id for d in clients.records.dead_letters()}


# --- separate worker processes -------------------------------------------------------------------

def _sessions(user_id: str, count: int) -> list[dict[str, Any]]:
    return [{**i.request, "user_id": user_id, "idempotency_key": f"{user_id}:{i.session_id}"}
            for i in read_locomo(LOCOMO, conversations=["conv-26"])[:count]]


def _memory_texts(data_dir: Path, user_id: str) -> list[str]:
    code = ("import json,sys; from memq.config import Settings; from pathlib import Path;"
            "from jobs.clients import build_clients; from memq.models import Scope;"
            f"c = build_clients(Settings(data_dir=Path({str(data_dir)!r})));"
            f"print(json.dumps(sorted(m.memory for m in c.vectors.list(Scope(user_id={user_id!r}), limit=10000))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=worker_env("redis://127.0.0.1:1/0", data_dir))
    texts: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return texts


@requires_locomo
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_worker_killed_mid_backfill_loses_nothing_and_ends_like_an_undisturbed_run(
        redis_server: RedisServer, tmp_path: Path, settings: Settings) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    # a message the kill catches between BRPOP and kombu's unacked record is rescued (tests/test_rescue.py)
    env = worker_env(url, tmp_path / "data", MEMQ_JOBS__RESCUE_AFTER_S="5", MEMQ_JOBS__RESCUE_EVERY_S="1")
    producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=url)}))
    producer._jobs.client.flushdb()
    worker = start_worker(env, tmp_path / "worker.log", pool="prefork")
    try:
        # Given a backfill of 8 sessions, and a prefork worker killed with SIGKILL once 2 have finished
        receipts = producer.add_many(_sessions("killed", 8))
        deadline = time.monotonic() + 120
        while sum(s.done for s in producer.wait(receipts, timeout_s=0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_worker(worker, signal.SIGKILL)
        assert sum(s.done for s in producer.wait(receipts, timeout_s=0)) < 8, "the backfill ended before the kill"
        # When a new worker starts
        worker = start_worker(env, tmp_path / "worker.log", pool="prefork")
        statuses = producer.wait(receipts, timeout_s=240, poll_s=0.2)
        # Then every job succeeded
        assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 8, (tmp_path / "worker.log").read_text()[-3000:]
        # And an undisturbed run of the same input leaves the same memories
        calm = producer.add_many(_sessions("calm", 8))
        assert all(s.status is JobState.SUCCEEDED for s in producer.wait(calm, timeout_s=240))
    finally:
        stop_worker(worker)
    killed, calm_texts = _memory_texts(tmp_path / "data", "killed"), _memory_texts(tmp_path / "data", "calm")
    assert killed and killed == calm_texts


@requires_locomo
@pytest.mark.faults
@pytest.mark.timeout(300)
def test_redis_restarted_during_a_backfill_refuses_cleanly_then_resumes_without_duplicates(
        tmp_path: Path, settings: Settings) -> None:
    with RedisServer(appendonly=True, data_dir=tmp_path / "redis") as server:
        env = worker_env(server.url, tmp_path / "data")
        producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=server.url,
                                                                                socket_timeout_s=1)}))
        sessions = _sessions("restart", 6)
        worker = start_worker(env, tmp_path / "worker.log", pool="threads")
        try:
            # Given half of a backfill enqueued
            first = producer.add_many(sessions[:3])
            deadline = time.monotonic() + 120  # until the worker has taken up the first job
            while producer.wait(first, timeout_s=0)[0].status is JobState.QUEUED and time.monotonic() < deadline:
                time.sleep(0.05)
            # When Redis goes down, Then the producer says so and nothing is half enqueued
            server.stop()
            with pytest.raises(BrokerUnavailable):
                producer.add_many(sessions[3:])
            # When Redis is back (AOF) and the whole backfill is run again
            server.start()
            again = producer.add_many(sessions)
            # Then the first half is recognised, the rest enqueued, and every job succeeds once
            assert [r.duplicate for r in again] == [True] * 3 + [False] * 3
            assert [r.job_id for r in again[:3]] == [r.job_id for r in first]
            statuses = producer.wait(again, timeout_s=240, poll_s=0.2)
            assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 6, \
                (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            stop_worker(worker)
    texts = _memory_texts(tmp_path / "data", "restart")
    assert texts and len(texts) == len(set(texts))



def test_dead_letters_are_listed_and_replayed_from_the_command_line(producer: Producer, llm_server: LLMTestServer,
                                                                    user_id: str) -> None:
    # Given a job that failed for good (the reply never parses)
    llm_server.script(Reply(content="no JSON here"))
    receipt = producer.add("I play the cello on Tuesdays.", user_id=user_id)
    job_id = receipt.job_id
    assert wait_done(producer, receipt).status is JobState.FAILED
    # When `memq dlq list` runs, Then it shows the job, its stage and why
    listed = subprocess.run([sys.executable, "-m", "cli", "dlq", "list", "--json"], capture_output=True,
                            text=True, check=True, env=os.environ.copy()).stdout
    letters = {row["job_id"]: row for row in map(json.loads, listed.splitlines())}
    assert letters[job_id]["stage"] == "memq.extract" and letters[job_id]["error_type"] == "LLMOutputError"
    # When `memq dlq replay JOB_ID` runs, Then the job runs again and succeeds
    subprocess.run([sys.executable, "-m", "cli", "dlq", "replay", job_id], check=True, env=os.environ.copy(),
                   capture_output=True)
    assert producer.wait_for(receipt, lambda s: s.status is JobState.SUCCEEDED, timeout_s=60).status \
        is JobState.SUCCEEDED

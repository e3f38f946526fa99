"""Tenant isolation: a job decides over and writes to its exact scope only; idempotency keys live in a
scope; id-based calls check the caller's scope; scope keys are injective (Redis, Neo4j)."""

from __future__ import annotations

import json
import subprocess
import sys
import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from memq.errors import JobNotFound, MemoryNotFound, MissingScope
from memq.models import AddJob, JobState, MemoryEvent, Scope
from producer import Producer
from tests.helpers import json_input, wait_done
from tests.rigs.llm_server import LLMTestServer


def _greedy(event: str) -> Callable[[str], str]:
    """A model that keeps each message as a fact and applies `event` to the first memory it is shown."""
    def answer(prompt: str) -> str:
        data = json_input(prompt)
        if data["task"] == "extract_facts":
            return json.dumps({"facts": [{"text": m["text"], "sources": [m["index"]]} for m in data["messages"]]})
        existing, fact = data["existing_memories"], data["new_facts"][0]
        if existing:
            return json.dumps({"memory": [{"id": "0", "text": fact, "event": event,
                                           "old_memory": existing[0]["text"]}]})
        return json.dumps({"memory": [{"id": "n", "text": fact, "event": "ADD"}]})
    return answer


# --- 1. a job sees and touches only its exact scope --------------------------------------------

@pytest.mark.parametrize("event", ["UPDATE", "DELETE"])
@pytest.mark.parametrize(("owner", "intruder"), [
    ({"user_id": "carol", "agent_id": "shared-bot"}, {"agent_id": "shared-bot"}),
    ({"user_id": "carol", "run_id": "run-1"}, {"user_id": "carol"}),
    ({"agent_id": "shared-bot"}, {"user_id": "carol", "agent_id": "shared-bot"}),
], ids=["agent-only add vs user+agent memory", "add without run_id vs run memory", "narrower add vs wider memory"])
def test_an_add_in_an_overlapping_scope_never_changes_another_scopes_memory(
        producer: Producer, memories: Any, model: Callable[[Callable[[str], str]], None], event: str,
        owner: dict[str, str], intruder: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:8]
    owner = {k: f"{v}-{tag}" for k, v in owner.items()}
    intruder = {k: f"{v}-{tag}" for k, v in intruder.items()}
    model(_greedy(event))
    # Given a memory of one scope
    first = wait_done(producer, producer.add("Carol is allergic to peanuts.", **owner))
    [kept] = first.results
    # When a job of an overlapping scope adds a similar fact with a model that UPDATEs or DELETEs
    # whatever it is shown
    second = wait_done(producer, producer.add("Carol is allergic to peanuts and cashews.", **intruder))
    # Then that job was shown nothing to change: it ADDed its own memory in its own scope
    assert second.status is JobState.SUCCEEDED
    assert [(r.event, r.id != kept.id) for r in second.results] == [(MemoryEvent.ADD, True)]
    # And the first memory is untouched, with its whole scope
    item = memories.get(kept.id, **owner)
    assert item is not None and item["memory"] == kept.memory
    assert {k: item[k] for k in ("user_id", "agent_id", "run_id")} == {
        "user_id": owner.get("user_id"), "agent_id": owner.get("agent_id"), "run_id": owner.get("run_id")}
    assert [m["id"] for m in memories.get_all(**owner)["results"] if m["id"] == kept.id] == [kept.id]


def test_a_plan_that_names_another_scopes_memory_writes_nothing_to_it(producer: Producer, memories: Any,
                                                                       settings: Any) -> None:
    from jobs.clients import build_clients
    from pipeline.apply import write_vectors
    from pipeline.types import Action, Plan

    user = f"victim-{uuid.uuid4().hex[:8]}"
    victim = wait_done(producer, producer.add("Dana keeps her savings in a blue tin.", user_id=user, infer=False)).results[0]
    c = build_clients(settings)
    # Given a stored plan of another scope's job that names the victim's memory (a corrupted or forged plan)
    job = AddJob(job_id=str(uuid.uuid4()), scope=Scope(user_id=user + "-x"),
                 messages=[{"role": "user", "content": "x"}])
    when = datetime.now(timezone.utc)
    plan = Plan(actions=[
        Action(event=MemoryEvent.UPDATE, memory_id=victim.id, memory="overwritten", vector=[0.1] * 384, created_at=when),
        Action(event=MemoryEvent.DELETE, memory_id=victim.id, memory=victim.memory, created_at=when)])
    # When the vector write applies it
    result = write_vectors(job, plan, c.vectors)
    # Then nothing of the victim's scope was touched
    assert (result.upserted, result.deleted) == (0, 0)
    assert memories.get(victim.id, user_id=user)["memory"] == victim.memory


# --- 2. idempotency keys live inside a scope ----------------------------------------------------

def test_the_same_idempotency_key_in_two_scopes_makes_two_jobs(producer: Producer, memories: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{tag}", f"bob-{tag}"
    # Given alice's add with a key
    a = producer.add("Alice's order 123 is a red bicycle.", user_id=alice, idempotency_key="order-123")
    # When bob adds with the same key
    b = producer.add("Bob's order 123 is a green kettle.", user_id=bob, idempotency_key="order-123")
    # Then bob's add is a job of its own, not alice's
    assert not a.duplicate and not b.duplicate and a.job_id != b.job_id
    assert wait_done(producer, b).status is JobState.SUCCEEDED
    assert "kettle" in json.dumps([m["memory"] for m in memories.get_all(user_id=bob)["results"]])
    # And bob cannot read alice's job; a retry of bob's key is bob's job
    with pytest.raises(JobNotFound):
        producer.status(a.job_id, user_id=bob)
    again = producer.add("Bob's order 123 is a green kettle.", user_id=bob, idempotency_key="order-123")
    assert again.duplicate and again.job_id == b.job_id


def test_job_ids_are_not_derivable_from_the_idempotency_key(producer: Producer, settings: Any,
                                                            redis_server: Any) -> None:
    import redis as redis_lib

    from memq.config import RedisSettings

    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    quiet = Producer(settings.model_copy(update={"redis": RedisSettings(url=url)}))
    client = redis_lib.Redis.from_url(url)
    try:
        # Given the same request with the same key, enqueued on two fresh brokers
        ids = []
        for _ in range(2):
            client.flushdb()
            ids.append(quiet.add("I like tea.", user_id="u", idempotency_key="backfill:chat.jsonl:c1:s1").job_id)
        # Then the job ids (and so the memory ids derived from them) differ: they are random
        assert ids[0] != ids[1]
        uuid.UUID(ids[0])
    finally:
        client.flushdb()
        client.close()
        quiet.close()


# --- 3. id-based calls check the caller's scope -------------------------------------------------

def test_id_based_reads_and_deletes_refuse_another_scope_as_if_the_id_were_unknown(
        producer: Producer, memories: Any, client: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    owner, other = f"owner-{tag}", f"other-{tag}"
    receipt = producer.add("Erin's locker code is 3141.", user_id=owner, agent_id="bot", infer=False)
    [memory] = wait_done(producer, receipt).results
    unknown = str(uuid.uuid4())
    # Then another scope gets exactly what an unknown id gets: get None, history [], status JobNotFound,
    # and update/delete MemoryNotFound (nothing enqueued)
    assert memories.get(memory.id, user_id=other) is None and memories.get(unknown, user_id=other) is None
    assert memories.history(memory.id, user_id=other) == [] == memories.history(unknown, user_id=other)
    for memory_id in (memory.id, unknown):
        with pytest.raises(MemoryNotFound):
            client.delete(memory_id, user_id=other)
        with pytest.raises(MemoryNotFound):
            client.update(memory_id, "Erin's locker code is 0000.", user_id=other)
    assert memories.get(memory.id, user_id=owner, agent_id="other-bot") is None
    for job_id in (receipt.job_id, unknown):
        with pytest.raises(JobNotFound):
            producer.status(job_id, user_id=other)
    # (waiting on a receipt forged for another scope too: the first read of a wait is scope-checked)
    with pytest.raises(JobNotFound):
        producer.wait([receipt.model_copy(update={"scope": Scope(user_id=other)})], timeout_s=5)
    # And no scope at all is refused
    with pytest.raises(MissingScope):
        memories.get(memory.id)
    with pytest.raises(MissingScope):
        producer.status(receipt.job_id)
    # And the owner's scope (Mem0's filter by the ids given) reads, then deletes it
    assert memories.get(memory.id, user_id=owner)["memory"] == memory.memory
    assert [h["event"] for h in memories.history(memory.id, agent_id="bot", user_id=owner)] == ["ADD"]
    assert producer.status(receipt.job_id, user_id=owner).status is JobState.SUCCEEDED
    assert client.delete(memory.id, user_id=owner) == {"message": "Memory deleted successfully!"}
    assert memories.get(memory.id, user_id=owner) is None


def test_the_command_line_needs_a_scope_for_status_and_history(producer: Producer) -> None:
    tag = uuid.uuid4().hex[:8]
    receipt = producer.add("Frank rides a red scooter.", user_id=f"frank-{tag}", infer=False)
    [memory] = wait_done(producer, receipt).results

    def memq(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=os.environ.copy())

    # Without a scope both refuse; with another scope they show nothing; with the owner's they show it
    assert memq("status", receipt.job_id).returncode == 1
    assert "MissingScope" in memq("history", memory.id).stdout
    assert "JobNotFound" in memq("status", receipt.job_id, "--user-id", "someone-else").stdout
    assert json.loads(memq("history", memory.id, "--user-id", "someone-else", "--json").stdout) == []
    assert json.loads(memq("status", receipt.job_id, "--user-id", f"frank-{tag}", "--json").stdout)["status"] == "succeeded"
    assert "succeeded" in memq("status", receipt.job_id, "--user-id", f"frank-{tag}").stdout
    assert [r["event"] for r in json.loads(memq("history", memory.id, "--user-id", f"frank-{tag}", "--json").stdout)] == ["ADD"]


# --- 4. scope keys are injective ---------------------------------------------------------------

ids = st.one_of(st.none(), st.text(alphabet=st.sampled_from("Aax|=&%r u"), min_size=1, max_size=6))


@hsettings(max_examples=300, deadline=None, derandomize=True)
@given(ids, ids, ids, ids, ids, ids)
def test_two_scopes_share_a_key_only_when_they_are_equal(u1: Any, a1: Any, r1: Any, u2: Any, a2: Any, r2: Any) -> None:
    if not (u1 or a1 or r1) or not (u2 or a2 or r2):
        return
    s1, s2 = Scope(user_id=u1, agent_id=a1, run_id=r1), Scope(user_id=u2, agent_id=a2, run_id=r2)
    assert (s1.key() == s2.key()) == (s1 == s2)


def test_scopes_the_old_key_confused_keep_separate_orders_and_graphs(producer: Producer, graph: Any,
                                                                     llm_server: LLMTestServer) -> None:
    tag = uuid.uuid4().hex[:6]
    first = {"user_id": f"A{tag}|a=x"}
    second = {"user_id": f"A{tag}", "agent_id": "x|a="}
    assert Scope(**first).key() != Scope(**second).key()
    reply = json.dumps({"facts": [{"text": "Gil works at Acme", "sources": [0]}],
                        "entities": [{"name": "Gil", "entity_type": "person"}, {"name": "Acme", "entity_type": "org"}],
                        "relations": [{"source": "Gil", "relationship": "WORKS_AT", "destination": "Acme"}]})
    llm_server.script(reply, reply)
    # Given two scopes whose ids would have made the same key before
    a = wait_done(producer, producer.add("I work at Acme.", **first))
    b = wait_done(producer, producer.add("I work at Acme.", **second))
    assert a.status is b.status is JobState.SUCCEEDED
    # Then each has its own entities and relations, and reads of one never return the other's
    mine, theirs = graph.all_relations(Scope(**first)), graph.all_relations(Scope(**second))
    assert len(mine) == len(theirs) == 1 and mine[0].rid != theirs[0].rid
    assert [r.rid for r in graph.relations_of(Scope(**first), ["gil"])] == [mine[0].rid]
    # And each scope has its own order counter in Redis
    client = producer._jobs.client
    assert client.get(f"memq:scope:{Scope(**first).key()}:seq") == b"1"
    assert client.get(f"memq:scope:{Scope(**second).key()}:seq") == b"1"

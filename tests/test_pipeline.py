"""The add pipeline end to end: producer -> Redis -> Celery stages (real worker) -> Qdrant + SQL history."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from memq.errors import MissingScope
from memq.models import JobState, MemoryEvent
from tests.rigs.llm_server import LLMTestServer, Reply
from tests.helpers import decisions_reply, facts_reply, wait_done


def test_an_add_becomes_searchable_memories_with_provenance(producer: Any, memories: Any, user_id: str,
                                                            llm_server: LLMTestServer) -> None:
    # Given a conversation with caller message ids
    messages = [
        {"role": "user", "name": "Alice", "id": "m1", "content": "Hi! I work as a nurse in Boston."},
        {"role": "assistant", "content": "Nice to meet you, Alice."},
        {"role": "user", "name": "Alice", "id": "m3", "content": "My dog Rex loves long hikes in the mountains."},
    ]
    # When it is added and the job runs
    receipt = producer.add(messages, user_id=user_id, metadata={"channel": "web"})
    status = wait_done(producer, receipt)
    # Then the job succeeded with ADD events, one extraction call and no decision call (nothing to compare)
    assert status.status is JobState.SUCCEEDED, status.error
    assert {r.event for r in status.results} == {MemoryEvent.ADD}
    assert llm_server.calls == 1
    # And search finds the right memory by meaning, in scope, with provenance and metadata
    found = memories.search("What is Alice's job?", user_id=user_id, limit=3)
    top = found["results"][0]
    assert "nurse" in top["memory"] and top["source_message_ids"] == ["m1"]
    assert top["metadata"] == {"channel": "web"} and top["user_id"] == user_id and top["actor_id"] == "Alice"
    assert set(found) == {"results", "relations"} and isinstance(found["relations"], list)
    assert top["score"] >= found["results"][-1]["score"]
    # And get, get_all and history agree
    assert memories.get(top["id"], user_id=user_id)["memory"] == top["memory"]
    assert len(memories.get_all(user_id=user_id)["results"]) == len(status.results)
    rows = memories.history(top["id"], user_id=user_id)
    assert [(r["event"], r["new_memory"], r["job_id"]) for r in rows] == [("ADD", top["memory"], receipt.job_id)]


def test_scopes_never_see_each_others_memories(producer: Any, memories: Any, user_id: str) -> None:
    other = user_id + "-other"
    a = producer.add("I am allergic to peanuts and shellfish.", user_id=user_id)
    b = producer.add("I am allergic to cats and dogs.", user_id=other)
    assert wait_done(producer, a).status is JobState.SUCCEEDED
    assert wait_done(producer, b).status is JobState.SUCCEEDED
    mine = memories.search("allergies", user_id=user_id)["results"]
    theirs = memories.search("allergies", user_id=other)["results"]
    assert mine and theirs
    assert all(m["user_id"] == user_id for m in mine) and all(m["user_id"] == other for m in theirs)
    assert not {m["id"] for m in mine} & {m["id"] for m in theirs}


def test_update_and_delete_decisions_rewrite_memory_and_history(producer: Any, memories: Any, user_id: str,
                                                                llm_server: LLMTestServer) -> None:
    # Given a stored memory
    llm_server.script(facts_reply("Alice lives in Boston"))
    first = wait_done(producer, producer.add("I live in Boston.", user_id=user_id))
    memory_id = first.results[0].id
    # When a later add's decision is UPDATE of existing id "0"
    llm_server.script(facts_reply("Alice moved to Denver"),
                      decisions_reply({"id": "0", "text": "Alice lives in Denver", "event": "UPDATE",
                                       "old_memory": "Alice lives in Boston"}))
    second = wait_done(producer, producer.add("I moved to Denver last month.", user_id=user_id))
    # Then the same memory id now holds the new text, with previous_memory in the result
    assert [(r.id, r.event, r.memory, r.previous_memory) for r in second.results] == [
        (memory_id, MemoryEvent.UPDATE, "Alice lives in Denver", "Alice lives in Boston")]
    assert memories.get(memory_id, user_id=user_id)["memory"] == "Alice lives in Denver"
    # And the decide prompt showed the memory under a small integer id, never its UUID
    decide_prompt = llm_server.requests[-1]["messages"][-1]["content"]
    assert '"id": "0"' in decide_prompt and memory_id not in decide_prompt
    # When a third add's decision is DELETE
    llm_server.script(facts_reply("Alice does not live in Denver anymore"),
                      decisions_reply({"id": "0", "text": "Alice lives in Denver", "event": "DELETE"}))
    third = wait_done(producer, producer.add("I don't live in Denver anymore.", user_id=user_id))
    assert [(r.id, r.event) for r in third.results] == [(memory_id, MemoryEvent.DELETE)]
    assert memories.get(memory_id, user_id=user_id) is None
    events = [(r["event"], r["old_memory"], r["new_memory"], r["is_deleted"]) for r in memories.history(memory_id, user_id=user_id)]
    assert events == [("ADD", None, "Alice lives in Boston", False),
                      ("UPDATE", "Alice lives in Boston", "Alice lives in Denver", False),
                      ("DELETE", "Alice lives in Denver", None, True)]


def test_ids_the_model_invents_are_dropped(producer: Any, memories: Any, user_id: str,
                                          llm_server: LLMTestServer) -> None:
    llm_server.script(facts_reply("Bob plays chess every Sunday"))
    kept = wait_done(producer, producer.add("I play chess every Sunday.", user_id=user_id)).results[0]
    # When the decider answers with an id it was never shown, plus one real ADD
    llm_server.script(facts_reply("Bob plays chess on Sundays at the club"),
                      decisions_reply({"id": "7", "text": "Bob quit chess", "event": "DELETE"},
                                      {"id": "c0ffee", "text": "Bob plays chess at the club", "event": "UPDATE"},
                                      {"id": "x", "text": "Bob goes to the chess club", "event": "ADD"}))
    status = wait_done(producer, producer.add("I play chess on Sundays at the club.", user_id=user_id))
    # Then only the ADD happens; the stored memory is untouched
    assert [(r.event, r.memory) for r in status.results] == [(MemoryEvent.ADD, "Bob goes to the chess club")]
    assert memories.get(kept.id, user_id=user_id)["memory"] == kept.memory


def test_an_unparseable_reply_fails_the_job_instead_of_meaning_no_facts(producer: Any, memories: Any, user_id: str,
                                                                         llm_server: LLMTestServer) -> None:
    llm_server.script(Reply(content="Sure! Here are the facts: the user likes tea."))
    status = wait_done(producer, producer.add("I like green tea.", user_id=user_id))
    assert status.status is JobState.FAILED
    assert status.error_type == "LLMOutputError" and status.stage == "memq.extract"
    assert memories.get_all(user_id=user_id)["results"] == []


def test_a_provider_that_refuses_the_request_fails_the_job_without_retrying(producer: Any, user_id: str,
                                                                             llm_server: LLMTestServer) -> None:
    llm_server.script(Reply(status=400))
    status = wait_done(producer, producer.add("I like green tea.", user_id=user_id))
    assert status.status is JobState.FAILED and status.error_type == "InvalidJob"
    assert llm_server.calls == 1


def test_infer_false_stores_each_message_without_calling_the_model(producer: Any, memories: Any, user_id: str,
                                                                   llm_server: LLMTestServer) -> None:
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Remember: gate code 4512"},
                {"role": "assistant", "content": "Noted, the gate code is 4512."}]
    status = wait_done(producer, producer.add(messages, agent_id=user_id, infer=False))
    assert llm_server.calls == 0
    assert [r.memory for r in status.results] == ["Remember: gate code 4512", "Noted, the gate code is 4512."]
    stored = memories.get_all(agent_id=user_id)["results"]
    assert sorted((m["role"], m["source_message_ids"][0]) for m in stored) == [("assistant", "2"), ("user", "1")]


def test_a_custom_prompt_replaces_the_extraction_instructions(producer: Any, user_id: str,
                                                              llm_server: LLMTestServer) -> None:
    prompt = "Only extract facts about food. Ignore everything else."
    wait_done(producer, producer.add("I love sushi and I work at a bank.", user_id=user_id, prompt=prompt))
    system = llm_server.requests[0]["messages"][0]["content"]
    assert system.startswith(prompt) and '"facts"' in system


def test_a_timestamp_backdates_the_memories(producer: Any, memories: Any, user_id: str) -> None:
    when = datetime(2023, 5, 8, 13, 56, tzinfo=timezone.utc)
    wait_done(producer, producer.add("I went to a support group yesterday.", user_id=user_id, timestamp=when))
    item = memories.get_all(user_id=user_id)["results"][0]
    assert datetime.fromisoformat(item["created_at"]) == when
    assert "7 May 2023" in item["memory"]  # the offline heuristic resolved "yesterday" against the timestamp


def test_search_filters_by_metadata_and_filters_never_widen_the_scope(producer: Any, memories: Any,
                                                                       user_id: str) -> None:
    wait_done(producer, producer.add("I love Italian food, especially pasta.", user_id=user_id,
                                     metadata={"topic": "food", "stars": 4}))
    wait_done(producer, producer.add("I work as an engineer at Acme.", user_id=user_id,
                                     metadata={"topic": "work", "stars": 2}))
    other = wait_done(producer, producer.add("I work as a nurse.", user_id=user_id + "-other",
                                             metadata={"topic": "work"}))
    found = memories.search("what does the user like", user_id=user_id, filters={"topic": "work"})["results"]
    assert found and all(m["metadata"]["topic"] == "work" for m in found)
    ranked = memories.search("x", user_id=user_id, filters={"stars": {"gte": 3}, "topic": {"icontains": "FOO"}})
    assert [m["metadata"]["topic"] for m in ranked["results"]] == ["food"]
    since = datetime(2000, 1, 1, tzinfo=timezone.utc)
    mine = {m["id"] for m in memories.get_all(user_id=user_id)["results"]}
    assert {m["id"] for m in memories.get_all(user_id=user_id, filters={"created_at": {"gte": since}})["results"]} \
        == mine
    # filters only narrow: "*" is "any value" inside the scope, and naming another user finds nothing
    assert {m["id"] for m in memories.search("work", user_id=user_id, filters={"user_id": "*"})["results"]} == mine
    assert memories.search("x", user_id=user_id, filters={"user_id": user_id + "-other"})["results"] == []
    assert memories.get_all(user_id=user_id, filters={"OR": [{"user_id": user_id + "-other"}, {"topic": "work"}]})[
        "results"][0]["user_id"] == user_id
    assert other.results[0].id not in {m["id"] for m in memories.get_all(
        user_id=user_id, filters={"OR": [{"user_id": user_id + "-other"}, {"topic": "*"}]})["results"]}


def test_search_without_a_scope_is_an_error(memories: Any) -> None:
    with pytest.raises(MissingScope):
        memories.search("anything")


def test_status_follows_a_job_to_its_result_shape(producer: Any, user_id: str) -> None:
    receipt = producer.add("I am training for a marathon in October.", user_id=user_id)
    assert receipt.status is JobState.QUEUED
    status = wait_done(producer, receipt)
    shape = json.loads(status.model_dump_json())
    assert shape["status"] == "succeeded" and isinstance(shape["relations"], list)
    assert set(shape["results"][0]) == {"id", "memory", "event", "previous_memory"}
    assert shape["counts"]["ADD"] == len(shape["results"])


def test_procedural_memory_stores_one_summary_for_the_agent(producer: Any, memories: Any, user_id: str) -> None:
    messages = [{"role": "user", "content": "Book a table for two at 8pm."},
                {"role": "assistant", "content": "Searched three restaurants; booked Chez Léa at 20:00."}]
    status = wait_done(producer, producer.add(messages, agent_id=user_id, memory_type="procedural_memory"))
    assert [r.event for r in status.results] == [MemoryEvent.ADD]
    [item] = memories.get_all(agent_id=user_id)["results"]
    assert item["metadata"] == {"memory_type": "procedural_memory"} and "Chez Léa" in item["memory"]


def test_a_job_whose_stored_request_is_invalid_fails_once_and_is_not_retried(settings: Any, worker: Any) -> None:
    import redis as redis_lib

    from broker.jobstore import JobStore
    from broker.messages import TaskMessages

    # Given a job whose stored request was corrupted after it was accepted
    client = redis_lib.Redis.from_url(settings.redis.url)
    job_id = "corrupt-" + user_id_suffix()
    client.set(f"memq:job:{job_id}:request", b'{"job_id": "x", "messages": "not a list"}')
    client.hset(f"memq:job:{job_id}", mapping={"status": "queued"})
    client.lpush(*TaskMessages().start(job_id))
    # When the worker picks it up, Then the job is failed with InvalidJob (no retry loop)
    jobs = JobStore(client, ttl_s=60)

    def ended() -> bool:
        status = jobs.statuses([job_id])[0]
        return status is not None and status.done

    deadline = time.monotonic() + 30
    while not ended() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = jobs.statuses([job_id])[0]
    assert status is not None and status.status is JobState.FAILED and status.error_type == "InvalidJob"
    client.close()


def user_id_suffix() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def test_delete_all_writes_a_delete_history_row_for_every_memory(producer: Any, memories: Any, client: Any,
                                                                   user_id: str) -> None:
    said = [{"role": "user", "content": t} for t in ("I moved to Lyon in March.", "My sister Ida is a nurse.")]
    status = wait_done(producer, producer.add(said, user_id=user_id, infer=False))
    ids = [r.id for r in status.results]
    assert len(ids) == 2

    assert client.delete_all(user_id=user_id) == {"message": "Memories deleted successfully!"}

    assert memories.get_all(user_id=user_id)["results"] == []
    for memory_id in ids:
        rows = memories.history(memory_id, user_id=user_id)
        assert [r["event"] for r in rows] == ["ADD", "DELETE"]
        assert rows[-1]["is_deleted"] and rows[-1]["new_memory"] is None and rows[-1]["job_id"] != status.job_id
        assert rows[-1]["old_memory"] == rows[0]["new_memory"]


def test_top_k_is_the_limit_of_a_search(producer: Any, memories: Any, user_id: str) -> None:
    said = [{"role": "user", "content": t} for t in ("I like tea.", "I like green tea.", "I like black tea.")]
    wait_done(producer, producer.add(said, user_id=user_id, infer=False))
    assert len(memories.search("tea", user_id=user_id, top_k=2)["results"]) == 2
    assert len(memories.search("tea", user_id=user_id, limit=1)["results"]) == 1

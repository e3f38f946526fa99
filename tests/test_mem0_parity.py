"""Mem0 parity, written from Mem0 1.0.11's documented behaviour and result shapes, against `memq.Memory`
with the real services: the ported quickstart script (examples/mem0_port.py) and the calls a switcher
relies on (update, delete, batches, delete_all, reset, rerank, the async twin).

The reference shapes are what real Mem0 1.0.11 returned for the same calls, recorded offline by
``bench/mem0_shapes.py`` into ``tests/fixtures/mem0_1_0_11_shapes.json`` (graph memory off there; the
``relations`` shapes below come from its ``graph_memory.py``):
- add: ``{"results": [{id, memory, event} (+ previous_memory on UPDATE; + actor_id, role with
  infer=False)]}``, plus ``"relations": {"added_entities", "deleted_entities"}`` with graph memory;
- search / get_all items: ``{id, memory, hash, metadata, score, created_at, updated_at}`` plus the
  scope, actor_id and role keys that are set; ``"relations"`` only with graph memory (search:
  ``{source, relationship, destination}``, get_all: ``{source, relationship, target}``);
- history rows: ``{id, memory_id, old_memory, new_memory, event, created_at, updated_at, is_deleted,
  actor_id, role}``; update / delete / delete_all: ``{"message": ...}``; reset: None.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from memq.errors import InvalidEdit, InvalidRequest, MemoryNotFound, MissingScope, ScopeMismatch
from memq.models import JobState
from tests.helpers import wait_done

ROOT = Path(__file__).resolve().parents[1]
MEM0 = json.loads((ROOT / "tests" / "fixtures" / "mem0_1_0_11_shapes.json").read_text())
"""What real Mem0 1.0.11 returned for the same calls (bench/mem0_shapes.py ran it offline; values masked)."""
PROMOTED = {"user_id", "agent_id", "run_id", "actor_id", "role"}
"""Keys Mem0 adds to an item only when the memory has them (its inferred memories carry no role)."""


def _keys(value: dict[str, Any]) -> set[str]:
    return set(value) - PROMOTED


ITEM = _keys(MEM0["search_operator_filters"]["results"][0])  # {id, memory, hash, metadata, score, ...}
LISTED = _keys(MEM0["get_all"]["results"][0])                # the same without score
HISTORY = set(MEM0["history"][0])
EVENTS = {"ADD": set(MEM0["add_infer"]["results"][0]), "UPDATE": set(MEM0["add_infer_update"]["results"][0]),
          "RAW": set(MEM0["add_no_infer"]["results"][0])}


def _item_shape(item: dict[str, Any], *, score: bool = True) -> None:
    assert _keys(item) - {"rerank_score", "occurred_at"} == (ITEM if score else LISTED), sorted(item)
    assert isinstance(item["id"], str) and isinstance(item["memory"], str) and isinstance(item["hash"], str)
    assert item["metadata"] is None or isinstance(item["metadata"], dict)


def _event_shape(event: dict[str, Any], *, raw: bool = False) -> None:
    assert set(event) == EVENTS["RAW" if raw else event["event"]], sorted(event)


def test_the_mem0_fixture_holds_what_mem0_returned() -> None:
    # The reference itself: Mem0's keys, as recorded (a regenerated fixture that changed them fails here)
    assert ITEM == {"id", "memory", "hash", "metadata", "score", "created_at", "updated_at"}
    assert LISTED == ITEM - {"score"} and MEM0["get"]["score"] == "null"
    assert HISTORY == {"id", "memory_id", "old_memory", "new_memory", "event", "created_at", "updated_at",
                       "is_deleted", "actor_id", "role"}
    assert EVENTS == {"ADD": {"id", "memory", "event"}, "UPDATE": {"id", "memory", "event", "previous_memory"},
                      "RAW": {"id", "memory", "event", "actor_id", "role"}}
    assert MEM0["reset"] is None and MEM0["delete_missing"]["_error"]["type"] == "builtins.ValueError"


@pytest.mark.timeout(300)  # a fresh interpreter loads the embedder, then 13 calls, 6 of them jobs
def test_the_ported_mem0_script_runs_unchanged_and_matches_mem0s_shapes(client: Any, settings: Any) -> None:
    client.delete_all(user_id="alice")  # the script's own user, left clean by other runs
    graph = settings.neo4j.uri is not None
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "mem0_port.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)

    for name in ("add", "add_raw", "add_prompt"):
        assert set(out[name]) == ({"results", "relations"} if graph else {"results"})
        for event in out[name]["results"]:
            _event_shape(event, raw=name == "add_raw")
        if graph:
            assert set(out[name]["relations"]) == {"added_entities", "deleted_entities"}
            for group in out[name]["relations"]["added_entities"]:
                assert [set(r) for r in group] == [{"source", "relationship", "target"}]
    assert out["add"]["results"] and all(e["event"] == "ADD" for e in out["add"]["results"])
    assert out["add_raw"]["results"] == [{"id": out["add_raw"]["results"][0]["id"], "event": "ADD",
                                          "memory": "My favourite director is Denis Villeneuve.",
                                          "actor_id": "alice", "role": "user"}]

    for name in ("search", "search_or", "get_all", "get_all_after_delete", "get_all_after_reset"):
        assert set(out[name]) == ({"results", "relations"} if graph else {"results"})
        for item in out[name]["results"]:
            _item_shape(item, score=name.startswith("search"))  # Mem0's get_all items have no score key
    assert all(isinstance(i["score"], float) for i in out["search"]["results"])
    # Operator filters narrowed the search: only movie memories of priority >= 1; food or priority > 4
    assert out["search"]["results"] and {i["metadata"]["category"] for i in out["search"]["results"]} == {"movies"}
    assert {(i["metadata"]["category"], i["metadata"]["priority"] if "priority" in i["metadata"] else None)
            for i in out["search_or"]["results"]} <= {("food", None), ("movies", 5)}
    assert any(i["metadata"]["category"] == "food" for i in out["search_or"]["results"])

    raw_id = out["add_raw"]["results"][0]["id"]
    _item_shape(out["get"])
    assert out["get"]["score"] is None and out["get"]["id"] == raw_id and out["get"]["user_id"] == "alice" and out["get"]["actor_id"] == "alice"
    assert out["update"] == MEM0["update"]
    assert [set(row) for row in out["history"]] == [HISTORY, HISTORY]
    # As in Mem0, every row's created_at is the memory's creation; updated_at the UPDATE's time
    assert out["history"][1]["created_at"] == out["history"][0]["created_at"] == out["get"]["created_at"]
    assert out["history"][0]["updated_at"] is None and out["history"][1]["updated_at"] > out["get"]["created_at"]
    assert [(r["event"], r["old_memory"], r["new_memory"]) for r in out["history"]] == [
        ("ADD", None, "My favourite director is Denis Villeneuve."),
        ("UPDATE", "My favourite director is Denis Villeneuve.",
         "Alice's favourite director is Denis Villeneuve (Dune).")]
    assert out["delete"] == MEM0["delete"]
    assert raw_id not in {i["id"] for i in out["get_all_after_delete"]["results"]}
    assert len(out["get_all_after_delete"]["results"]) == len(out["get_all"]["results"]) - 1
    assert out["reset"] is MEM0["reset"] is None and out["get_all_after_reset"]["results"] == []
    if graph:
        assert out["get_all_after_reset"]["relations"] == []


def test_update_merges_metadata_keeps_created_at_and_refuses_what_mem0_refuses(client: Any, user_id: str) -> None:
    [added] = client.add("I drink two coffees a day.", user_id=user_id, infer=False,
                         metadata={"topic": "drinks", "n": 2})["results"]
    before = client.get(added["id"], user_id=user_id)
    assert client.update(added["id"], metadata={"n": 3}, user_id=user_id) == {"message": "Memory updated successfully!"}
    after = client.get(added["id"], user_id=user_id)
    assert after["memory"] == "I drink two coffees a day." and after["metadata"] == {"topic": "drinks", "n": 3}
    assert after["created_at"] == before["created_at"] and after["updated_at"] is not None
    assert after["hash"] == before["hash"]
    # Then the new text is what search finds, and the vector moved with it
    client.update(added["id"], text="I quit coffee; I drink green tea now.", user_id=user_id)
    top = client.search("green tea", user_id=user_id, limit=1)["results"][0]
    assert top["id"] == added["id"] and top["memory"] == "I quit coffee; I drink green tea now."
    with pytest.raises(InvalidEdit):
        client.update(added["id"], user_id=user_id)  # neither text nor metadata
    with pytest.raises(MemoryNotFound) as missing:
        client.update(str(uuid.uuid4()), "x", user_id=user_id)
    assert isinstance(missing.value, ValueError)  # Mem0 raises ValueError: a port's except clause still holds
    with pytest.raises(MissingScope):
        client.update(added["id"], "x")


def test_batches_reach_every_scope_the_caller_covers_and_are_all_or_nothing(client: Any, user_id: str) -> None:
    mine = client.add("I live in Oslo.", user_id=user_id, infer=False)["results"][0]["id"]
    bots = client.add("The user likes jazz.", user_id=user_id, agent_id="dj", infer=False)["results"][0]["id"]
    stranger = client.add("I live in Rome.", user_id=user_id + "-x", infer=False)["results"][0]["id"]
    # A batch naming another tenant's memory is refused whole: nothing is enqueued, nothing changes
    with pytest.raises(MemoryNotFound):
        client.batch_update([{"memory_id": mine, "text": "I live in Bergen."}, {"memory_id": stranger, "text": "x"}],
                            user_id=user_id)
    assert client.get(mine, user_id=user_id)["memory"] == "I live in Oslo."
    with pytest.raises(InvalidEdit):
        client.batch_delete([{"memory_id": str(uuid.uuid4())}] * 1001, user_id=user_id)
    with pytest.raises(InvalidEdit):
        client.batch_delete([{"memory_id": mine}, {"memory_id": mine}], user_id=user_id)
    # A batch over two exact scopes (alice's own and alice-with-dj's) runs one job per scope
    done = client.batch_update([{"memory_id": mine, "text": "I live in Bergen."},
                                {"memory_id": bots, "metadata": {"genre": "jazz"}}], user_id=user_id)
    assert done == {"message": "Successfully updated 2 memories"}
    assert client.get(bots, user_id=user_id)["metadata"] == {"genre": "jazz"}
    assert client.batch_delete([{"memory_id": mine}, {"memory_id": bots}], user_id=user_id) == {
        "message": "Successfully deleted 2 memories"}
    assert client.get_all(user_id=user_id)["results"] == []
    assert client.get(stranger, user_id=user_id + "-x")["memory"] == "I live in Rome."
    assert [h["event"] for h in client.history(bots, user_id=user_id)] == ["ADD", "UPDATE", "DELETE"]


def test_delete_all_follows_adds_already_accepted_even_in_a_new_scope(client: Any, producer: Any, user_id: str) -> None:
    client.add("I play chess.", user_id=user_id, infer=False)
    # An add accepted (not yet run) in a scope that has no memory yet, then delete_all at once
    pending = client.add("I play go.", user_id=user_id, run_id="night", infer=False, wait=False)
    assert client.delete_all(user_id=user_id) == MEM0["delete_all"]
    # Then the add ran first (its scope's order) and its memory is gone too
    assert client.status(pending).status is JobState.SUCCEEDED
    assert client.get_all(user_id=user_id)["results"] == []
    # And a memory-less scope has nothing to do: no job at all
    assert client.delete_all(user_id=user_id + "-none", wait=False) == []


def test_edits_run_in_the_scope_order_after_an_accepted_add(client: Any, producer: Any, user_id: str) -> None:
    [first] = client.add("I own a red bike.", user_id=user_id, infer=False)["results"]
    # An add (accepted, not waited for) and then a delete of the same scope: the delete waits for the add
    later = client.add("I own a blue car.", user_id=user_id, infer=False, wait=False)
    receipt = client.delete(first["id"], user_id=user_id, wait=False)
    status = wait_done(producer, receipt)
    assert status.status is JobState.SUCCEEDED and [r.event.value for r in status.results] == ["DELETE"]
    added = client.status(later)
    assert added.status is JobState.SUCCEEDED and added.updated_at <= status.updated_at
    assert [m["memory"] for m in client.get_all(user_id=user_id)["results"]] == ["I own a blue car."]


def test_a_bound_client_narrows_its_scope_but_never_leaves_it(settings: Any, worker: Any, user_id: str) -> None:
    from memq import Memory

    bound = Memory(settings, user_id=user_id, wait=True, timeout=90.0)
    try:
        bound.add("I am vegetarian.", infer=False)
        bound.add("Bot note: prefers short answers.", agent_id="helper", infer=False)
        assert len(bound.get_all()["results"]) == 2
        assert [m["memory"] for m in bound.get_all(agent_id="helper")["results"]] == ["Bot note: prefers short answers."]
        with pytest.raises(ScopeMismatch):
            bound.search("food", user_id=user_id + "-other")
        with pytest.raises(MissingScope):
            Memory(settings).reset()  # an unbound client has no "everyone" to reset
        assert bound.reset() is None and bound.get_all()["results"] == []
    finally:
        bound.close()


def test_rerank_reorders_hits_by_the_rerank_model(settings: Any, worker: Any, llm_server: Any, user_id: str) -> None:
    from memq import Memory
    from memq.config import RerankSettings

    ranked = Memory(settings.model_copy(update={"rerank": RerankSettings(
        model="cohere/rerank-english-v3.0", api_base=llm_server.url, api_key="test-key", candidates=10)}),
        wait=True, timeout=90.0)
    try:
        texts = ["Paris trip in May with my sister and her two kids", "Paris", "A trip to Paris in May"]
        ranked.add([{"role": "user", "content": t} for t in texts], user_id=user_id, infer=False)
        plain = ranked.search("Paris trip in May", user_id=user_id, rerank=False)["results"]
        reranked = ranked.search("Paris trip in May", user_id=user_id, limit=2)["results"]
    finally:
        ranked.close()
    assert all("rerank_score" not in i for i in plain) and len(reranked) == 2
    # The server scores the share of a memory's words found in the query: "Paris" (1.0) first
    assert [i["memory"] for i in reranked] == ["Paris", "A trip to Paris in May"]
    assert reranked[0]["rerank_score"] == 1.0 and reranked[0]["rerank_score"] > reranked[1]["rerank_score"]
    [request] = llm_server.rerank_requests
    assert request["query"] == "Paris trip in May" and len(request["documents"]) == 3


def test_async_memory_is_the_same_client_in_a_thread(settings: Any, worker: Any, user_id: str) -> None:
    from memq import AsyncMemory

    async def scenario() -> tuple[Any, Any]:
        m = AsyncMemory(settings, wait=True, timeout=90.0)
        added = await m.add("I collect stamps.", user_id=user_id, infer=False)
        found = await m.search("stamps", user_id=user_id)
        await m.delete(added["results"][0]["id"], user_id=user_id)
        return found, await m.get_all(user_id=user_id)

    found, left = asyncio.run(scenario())
    assert found["results"][0]["memory"] == "I collect stamps." and left["results"] == []


def test_ids_receipts_and_options_are_checked_like_everything_else(settings: Any, worker: Any, client: Any,
                                                                   user_id: str) -> None:
    from memq import Memory
    from memq.errors import InvalidOption, RequestTooLarge
    from memq.models import Receipt, Scope

    [added] = client.add("I keep bees.", user_id=user_id, infer=False)["results"]
    # A UUID in another spelling is the same memory for every id-based call
    loud = added["id"].upper()
    assert client.get(loud, user_id=user_id)["id"] == added["id"]
    assert client.update(loud, "I keep two hives of bees.", user_id=user_id)["message"]
    assert [h["event"] for h in client.history("{" + added["id"] + "}", user_id=user_id)] == ["ADD", "UPDATE"]
    with pytest.raises(InvalidRequest):
        client.history(12345, user_id=user_id)
    bound = Memory(settings, user_id=user_id + "-other", wait=True, timeout=90.0)
    try:
        # A bound client does not read another tenant's job through a receipt naming that tenant
        receipt = client.add("I keep wasps.", user_id=user_id, infer=False, wait=False)
        with pytest.raises(ScopeMismatch):
            bound.status(receipt)
        forged = Receipt(job_id=receipt.job_id, scope=Scope(user_id=user_id + "-other"))
        from memq.errors import JobNotFound

        with pytest.raises(JobNotFound):
            bound.status(forged)
    finally:
        bound.close()
    with pytest.raises(InvalidOption):
        client.delete(added["id"], user_id=user_id, wait="no")
    with pytest.raises(InvalidOption):
        client.delete(added["id"], user_id=user_id, timeout="60")
    with pytest.raises(InvalidOption):
        Memory(settings, timeout=0)
    with pytest.raises(RequestTooLarge):  # a batch's texts are capped like an add's (one embedding call)
        client.batch_update([{"memory_id": str(uuid.uuid4()), "text": "x" * 20_000} for _ in range(11)],
                            user_id=user_id)
    assert client.get(added["id"], user_id=user_id)["memory"] == "I keep two hives of bees."

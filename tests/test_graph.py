"""Graph memory on a real Neo4j (5.26 through its test harness): entities and relations written in
parallel with vectors, at most two model calls per add."""

from __future__ import annotations

import json
from typing import Any

import pytest

from memq.models import JobState, Scope
from tests.rigs.llm_server import LLMTestServer
from tests.rigs.neo4j_server import Neo4jServer
from producer.backfill import read_locomo
from stores.graph import InvalidRelationshipType, relationship_type
from tests.conftest import LOCOMO, requires_locomo
from tests.helpers import PARKED, by_hand_clients, wait_done

INJECTED = "KNOWS]->(x) DETACH DELETE x //"


def _graph_reply(facts: list[str], entities: list[tuple[str, str]], relations: list[tuple[str, str, str]]) -> str:
    return json.dumps({"facts": [{"text": f, "sources": [0]} for f in facts],
                       "entities": [{"name": n, "entity_type": t} for n, t in entities],
                       "relations": [{"source": s, "relationship": r, "destination": d} for s, r, d in relations]})


def _everything(graph: Any) -> list[dict[str, Any]]:
    return graph._run("MATCH (n) OPTIONAL MATCH (n)-[r]->(m) "
                      "RETURN n.key AS n, type(r) AS r, m.key AS m, r.valid AS valid ORDER BY n, r, m")


def test_relationship_types_are_normalized_and_cypher_is_refused() -> None:
    assert relationship_type("works at") == "WORKS_AT" and relationship_type("sister-of") == "SISTER_OF"
    for bad in (INJECTED, "1ST", "", "A" * 65, "LIKES`", "ÉTÉ"):
        with pytest.raises(InvalidRelationshipType):
            relationship_type(bad)


@requires_locomo
def test_locomo_sessions_land_as_entities_and_relations_in_their_scope(producer: Any, memories: Any, graph: Any,
                                                                       user_id: str, llm_server: LLMTestServer) -> None:
    # Given two LoCoMo sessions added for one scope (the offline heuristic answers over HTTP)
    items = read_locomo(LOCOMO, conversations=["conv-26"])[:2]
    calls = []
    for item in items:
        request = {**item.request, "user_id": user_id, "idempotency_key": None}
        before = llm_server.calls
        status = wait_done(producer, producer.add_many([request])[0])
        assert status.status is JobState.SUCCEEDED, status.error
        calls.append(llm_server.calls - before)
    # Then the speakers and what they named are entities of this scope, with relations between them
    names = {e["name"] for e in graph.entities(Scope(user_id=user_id))}
    assert {"Caroline", "Melanie"} <= names
    relations = graph.all_relations(Scope(user_id=user_id))
    assert relations and all(r.relationship == relationship_type(r.relationship) for r in relations)
    # And an add costs at most two model calls (one when nothing existed to decide against)
    assert calls[0] == 1 and all(c <= 2 for c in calls)
    # And search returns relations next to memories, only from this scope
    found = memories.search("What did Caroline go to?", user_id=user_id)
    assert found["results"] and any(r["source"] == "Caroline" for r in found["relations"])
    assert memories.search("What did Caroline go to?", user_id=user_id + "-x")["relations"] == []


def test_a_contradicting_fact_invalidates_the_old_relation_and_keeps_it(producer: Any, memories: Any, graph: Any,
                                                                        user_id: str, llm_server: LLMTestServer) -> None:
    llm_server.script(_graph_reply(["Ann lives in Boston"], [("Ann", "person"), ("Boston", "city")],
                                   [("Ann", "lives in", "Boston")]))
    first = wait_done(producer, producer.add("I live in Boston.", user_id=user_id))
    assert first.relations == [{"source": "ann", "relationship": "LIVES_IN", "destination": "boston"}]
    # When a later fact contradicts it and the decider says so (relation id "0", as shown)
    llm_server.script(_graph_reply(["Ann lives in Denver"], [("Ann", "person"), ("Denver", "city")],
                                   [("Ann", "LIVES_IN", "Denver")]),
                      json.dumps({"memory": [{"id": "0", "text": "Ann lives in Denver", "event": "UPDATE",
                                              "old_memory": "Ann lives in Boston"}],
                                  "invalidated_relations": ["0", "9"]}))
    second = wait_done(producer, producer.add("I moved to Denver.", user_id=user_id))
    assert second.status is JobState.SUCCEEDED
    decide_prompt = json.loads(llm_server.requests[-1]["messages"][-1]["content"].removeprefix("Input:\n"))
    assert decide_prompt["existing_relations"] == [
        {"id": "0", "source": "Ann", "relationship": "LIVES_IN", "destination": "Boston"}]
    # Then the old relation is kept but invalid, the new one valid, and search shows only valid ones
    stored = {(r.destination, r.valid) for r in graph.all_relations(Scope(user_id=user_id), include_invalid=True)}
    assert stored == {("Boston", False), ("Denver", True)}
    relations = memories.search("Where does Ann live?", user_id=user_id)["relations"]
    assert relations == [{"source": "Ann", "relationship": "LIVES_IN", "destination": "Denver"}]


def test_an_injected_relationship_type_is_rejected_and_the_graph_is_unchanged(
        producer: Any, graph: Any, user_id: str, llm_server: LLMTestServer) -> None:
    before = _everything(graph)
    llm_server.script(_graph_reply(["Ann knows Bob"], [("Ann", "person"), ("Bob", "person")],
                                   [("Ann", INJECTED, "Bob")]))
    status = wait_done(producer, producer.add("I know Bob.", user_id=user_id))
    # The memory is stored, the injected relation is not, and nothing else in the graph changed
    assert status.status is JobState.SUCCEEDED and status.relations == []
    after = _everything(graph)
    added = [row for row in after if row not in before]
    assert {row["n"] for row in added} <= {"ann", "bob"} and all(row["r"] is None for row in added)
    assert all(row in after for row in before)


def test_two_scopes_never_see_each_others_graph(producer: Any, memories: Any, graph: Any, user_id: str,
                                                client: Any, llm_server: LLMTestServer) -> None:
    other = user_id + "-b"
    reply = _graph_reply(["Ann works at Acme"], [("Ann", "person"), ("Acme", "company")], [("Ann", "WORKS_AT", "Acme")])
    llm_server.script(reply, reply)
    wait_done(producer, producer.add("I work at Acme.", user_id=user_id))
    wait_done(producer, producer.add("I work at Acme.", user_id=other))
    mine, theirs = graph.all_relations(Scope(user_id=user_id)), graph.all_relations(Scope(user_id=other))
    assert len(mine) == len(theirs) == 1 and mine[0].rid != theirs[0].rid
    client.delete_all(user_id=user_id)
    assert graph.entities(Scope(user_id=user_id)) == [] and memories.get_all(user_id=user_id)["results"] == []
    assert len(graph.all_relations(Scope(user_id=other))) == 1
    assert memories.search("Where does Ann work?", user_id=other)["relations"] == [
        {"source": "Ann", "relationship": "WORKS_AT", "destination": "Acme"}]


def test_deleting_a_memory_leaves_no_orphaned_entity_or_relation(producer: Any, graph: Any, user_id: str,
                                                                 client: Any, llm_server: LLMTestServer) -> None:
    llm_server.script(_graph_reply(["Ann has a cat named Pixel"], [("Ann", "person"), ("Pixel", "cat")],
                                   [("Ann", "HAS_PET", "Pixel")]))
    status = wait_done(producer, producer.add("My cat is Pixel.", user_id=user_id))
    assert graph.embedded_keys(Scope(user_id=user_id), ["ann", "pixel"]) == {"ann", "pixel"}
    assert client.delete(status.results[0].id, user_id=user_id) == {"message": "Memory deleted successfully!"}
    assert graph.all_relations(Scope(user_id=user_id), include_invalid=True) == []
    assert graph.entities(Scope(user_id=user_id)) == []
    # and the entities' name points went too (finalize removes those of entities the graph write deleted)
    assert graph.embedded_keys(Scope(user_id=user_id), ["ann", "pixel"]) == set()


def test_a_retried_graph_write_leaves_the_same_graph(producer: Any, graph: Any, user_id: str,
                                                     llm_server: LLMTestServer) -> None:
    from jobs.clients import build_clients
    from pipeline.apply import write_graph
    from pipeline.types import Plan

    llm_server.script(_graph_reply(["Ann plays tennis with Bob"], [("Ann", "person"), ("Bob", "person")],
                                   [("Ann", "PLAYS_TENNIS_WITH", "Bob")]))
    receipt = producer.add("I play tennis with Bob.", user_id=user_id)
    wait_done(producer, receipt)
    before = _everything(graph), graph.entities(Scope(user_id=user_id))
    # When the graph write runs again for the same job (a retry or a redelivery)
    c = build_clients(producer.settings)
    job, plan = c.ledger.job(receipt.job_id), c.ledger.output(receipt.job_id, "decide", Plan)
    assert plan is not None
    write_graph(job, plan, graph)
    write_graph(job, plan, graph)
    # Then nothing changed: same nodes, same relations, mention counts not inflated
    assert (_everything(graph), graph.entities(Scope(user_id=user_id))) == before
    assert all(e["mentions"] == 1 for e in before[1])


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_neo4j_stopped_mid_job_gives_a_partial_job_that_completes_when_it_returns(
        producer: Any, memories: Any, graph: Any, neo4j_server: Neo4jServer, user_id: str,
        llm_server: LLMTestServer) -> None:
    # Given Neo4j goes down before a job is written
    neo4j_server.stop()
    try:
        llm_server.script(_graph_reply(["Ann sings in a choir"], [("Ann", "person"), ("Choir", "group")],
                                       [("Ann", "SINGS_IN", "Choir")]))
        receipt = producer.add("I sing in a choir.", user_id=user_id)
        # Then the vector write lands and the job is partial, its memory already searchable
        status = producer.wait_for(receipt, lambda s: s.status is JobState.PARTIAL and bool(s.results), timeout_s=90)
        assert status.status is JobState.PARTIAL and status.error_type == "StoreUnavailable", status
        assert memories.get(status.results[0].id, user_id=user_id) is not None
        # and so are the entities' name points: the vector write holds them and needs no Neo4j
        assert graph.embedded_keys(Scope(user_id=user_id), ["ann", "choir"]) == {"ann", "choir"}
    finally:
        # When Neo4j comes back
        neo4j_server.start()
    # Then the graph write is retried and the job ends succeeded, with its relation in the graph
    final = wait_done(producer, receipt, timeout_s=180)
    assert final.status is JobState.SUCCEEDED
    assert [r.relationship for r in graph.all_relations(Scope(user_id=user_id))] == ["SINGS_IN"]


@pytest.mark.faults
@pytest.mark.timeout(240)
def test_finalize_with_neo4j_down_still_ends_the_job_and_leaves_the_deleted_entities_name_points(
        producer: Any, settings: Any, graph: Any, neo4j_server: Neo4jServer, user_id: str,
        llm_server: LLMTestServer, caplog: pytest.LogCaptureFixture) -> None:
    from jobs import add
    from jobs.transitions import Finished
    from memq.models import Edit, Operation
    from pipeline.types import WriteResult
    from producer.edits import build_edit_job

    # Given a memory whose two entities have name points
    llm_server.script(_graph_reply(["Ann has a parrot named Kiwi"], [("Ann", "person"), ("Kiwi", "parrot")],
                                   [("Ann", "HAS_PET", "Kiwi")]))
    added = wait_done(producer, producer.add("My parrot is Kiwi.", user_id=user_id))
    scope = Scope(user_id=user_id)
    # and its deletion driven by hand up to finalize (its messages go to a queue no worker reads)
    c = by_hand_clients(settings)
    try:
        [(job_id, _)] = c.ledger.jobs.enqueue([build_edit_job(Operation.DELETE, scope, [Edit(memory_id=added.results[0].id)])])
        for life in (add.start, add.decide, add.write_vectors, add.write_graph):
            c.ledger.commit(job_id, life(job_id, c))
        written = c.ledger.output(job_id, "write_graph", WriteResult)
        assert written is not None and set(written.forgotten_entities) == {"ann", "kiwi"}
        # When Neo4j is down as finalize runs
        neo4j_server.stop()
        try:
            with caplog.at_level("WARNING", logger="jobs.add"):
                done = add.finalize(job_id, c)
        finally:
            neo4j_server.start()
        # Then the job still ends succeeded (its writes landed), the skipped removal is logged, and the
        # name points are left in place (graph search finds no entity through them)
        assert isinstance(done, Finished) and done.state is JobState.SUCCEEDED, done
        assert "name points of 2 deleted entities left in place (StoreUnavailable" in caplog.text
        assert graph.embedded_keys(scope, ["ann", "kiwi"]) == {"ann", "kiwi"}
        assert c.ledger.commit(job_id, done) == "ok"
        assert c.ledger.jobs.status(job_id).status is JobState.SUCCEEDED
        assert graph.entities(scope) == []
    finally:
        c.ledger.jobs.client.delete(PARKED)


def test_one_write_merges_relations_of_every_type_and_embeds_only_names_new_to_the_scope(graph: Any,
                                                                                          user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation
    from stores.graph import EntityWrite, GraphWrite

    embedded: list[list[str]] = []

    def embed(names: list[str]) -> list[list[float]]:
        embedded.append(names)
        return [[float(len(n))] + [0.0] * 383 for n in names]

    scope = Scope(user_id=user_id)

    def write(entities: list[EntityWrite], relations: list[Relation]) -> None:
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=scope, when=datetime.now(timezone.utc),
                               entities=entities, relations=relations), embed=embed)

    def rel(source: str, kind: str, destination: str) -> Relation:
        return Relation(rid=str(uuid.uuid4()), source=source, relationship=kind, destination=destination,
                        memory_ids=[str(uuid.uuid4())])

    # Given a job naming three entities, one with the embedding its decide stage made, and three relation types
    given = [0.5] * 384
    write([EntityWrite("ana", "Ana", "person", given), EntityWrite("lisbon", "Lisbon", "city"),
           EntityWrite("chess club", "chess club", "club")],
          [rel("ana", "LIVES_IN", "lisbon"), rel("ana", "MEMBER_OF", "chess club"), rel("chess club", "MEETS_IN", "lisbon")])
    # Then every relation landed with its type, the two bare names were embedded in one batch, the given one kept
    triples = {(r.source.lower(), r.relationship, r.destination.lower()) for r in graph.all_relations(scope)}
    assert triples == {("ana", "LIVES_IN", "lisbon"), ("ana", "MEMBER_OF", "chess club"),
                       ("chess club", "MEETS_IN", "lisbon")}
    assert embedded == [["Lisbon", "chess club"]]
    assert graph.embedded_keys(scope, ["ana", "lisbon", "chess club", "porto"]) == {"ana", "lisbon", "chess club"}
    # and the embeddings are points of the entity-name collection, not node properties: the given one for Ana
    # (cosine 1 with itself), Lisbon's made by the embed function (cosine 1/sqrt(384) with Ana's)
    near = {h.key: round(h.score, 3) for h in graph.names.similar(scope, given, limit=5, threshold=0.0)}
    assert near == {"ana": 1.0, "lisbon": round(384 ** -0.5, 3), "chess club": round(384 ** -0.5, 3)}
    assert graph._run("MATCH (n:__Entity__ {user_id: $u}) WHERE n.embedding IS NOT NULL RETURN n.key AS k",
                      u=user_id) == []
    # When a later job names them again without embeddings (its decide stage found them embedded)
    write([EntityWrite("ana", "Ana", "person"), EntityWrite("lisbon", "Lisbon", "city")], [rel("ana", "VISITS", "lisbon")])
    # Then nothing is embedded again and the stored embeddings stay
    assert embedded == [["Lisbon", "chess club"]]
    assert graph.names.similar(scope, given, limit=1, threshold=0.9)[0].key == "ana"
    assert graph._run("MATCH (n:__Entity__ {user_id: $u, key: 'ana'}) RETURN n.mentions AS m", u=user_id) == [{"m": 2}]


@pytest.mark.timeout(240)
def test_mentions_count_every_job_while_job_ids_keep_only_the_latest(graph: Any, user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from stores.graph import RECENT_JOBS, EntityWrite, GraphWrite

    scope = Scope(user_id=user_id)
    jobs = [str(uuid.uuid4()) for _ in range(RECENT_JOBS + 4)]

    def write(job_id: str) -> None:
        graph.write(GraphWrite(job_id=job_id, scope=scope, when=datetime.now(timezone.utc),
                               entities=[EntityWrite("ana", "Ana", "person", [0.5] * 384)]))

    # Given more jobs naming one entity than it keeps ids of, the latest written twice (a retry)
    for job_id in jobs:
        write(job_id)
    write(jobs[-1])
    # Then every job counts once, and only the latest ids are kept, newest last
    [row] = graph._run("MATCH (n:__Entity__ {user_id: $u}) RETURN n.mentions AS m, n.job_ids AS ids", u=user_id)
    assert row == {"m": len(jobs), "ids": jobs[-RECENT_JOBS:]}


@pytest.mark.timeout(240)
def test_one_write_can_merge_invalidate_and_forget_together(graph: Any, user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation
    from stores.graph import EntityWrite, GraphWrite

    scope, other = Scope(user_id=user_id), Scope(user_id=user_id + "-other")
    vector = [0.5] * 384
    old_memory, kept_memory = str(uuid.uuid4()), str(uuid.uuid4())

    def write(target: Scope, **change: Any) -> None:
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=target, when=datetime.now(timezone.utc), **change))

    def rel(source: str, kind: str, destination: str, memory: str) -> Relation:
        return Relation(rid=str(uuid.uuid4()), source=source, relationship=kind, destination=destination,
                        memory_ids=[memory])

    entities = [EntityWrite(k, k.title(), "thing", vector) for k in ("ana", "lisbon", "porto", "chess")]
    lives = rel("ana", "LIVES_IN", "lisbon", kept_memory)
    plays = rel("ana", "PLAYS", "chess", old_memory)
    for target in (scope, other):
        write(target, entities=entities, relations=[lives, plays])
    # When one job adds a relation, contradicts one and deletes the memory supporting another
    write(scope, entities=entities[:3], relations=[rel("ana", "LIVES_IN", "porto", str(uuid.uuid4()))],
          invalidated=[lives], deleted_memory_ids=[old_memory])
    # Then the new relation is valid, the contradicted one kept as invalid, the unsupported one and its bare
    # entity gone; the other scope, holding the same rids and memory ids, is untouched
    mine = {(r.source.lower(), r.relationship, r.destination.lower(), r.valid)
            for r in graph.all_relations(scope, include_invalid=True)}
    assert mine == {("ana", "LIVES_IN", "porto", True), ("ana", "LIVES_IN", "lisbon", False)}
    assert {e["key"] for e in graph.entities(scope)} == {"ana", "lisbon", "porto"}
    theirs = {(r.source.lower(), r.relationship, r.destination.lower(), r.valid)
              for r in graph.all_relations(other, include_invalid=True)}
    assert theirs == {("ana", "LIVES_IN", "lisbon", True), ("ana", "PLAYS", "chess", True)}


@pytest.mark.timeout(240)
def test_forget_memories_drops_what_they_alone_supported_in_their_scope_only(graph: Any, user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation
    from stores.graph import EntityWrite, GraphWrite

    scope, other = Scope(user_id=user_id), Scope(user_id=user_id + "-other")
    gone, kept = str(uuid.uuid4()), str(uuid.uuid4())
    entities = [EntityWrite(k, k.title(), "thing", [0.5] * 384) for k in ("ana", "lisbon", "chess")]
    relations = [Relation(rid=str(uuid.uuid4()), source="ana", relationship="LIVES_IN", destination="lisbon",
                          memory_ids=[kept, gone]),
                 Relation(rid=str(uuid.uuid4()), source="ana", relationship="PLAYS", destination="chess",
                          memory_ids=[gone])]
    for target in (scope, other):
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=target, when=datetime.now(timezone.utc),
                               entities=entities, relations=relations))
    # When one memory is forgotten in one scope
    graph.forget_memories(scope, [gone])
    # Then what it alone supported is gone there (the relation, then its bare entity), the rest and the other scope stay
    assert {(r.relationship, r.destination.lower()) for r in graph.all_relations(scope)} == {("LIVES_IN", "lisbon")}
    assert {e["key"] for e in graph.entities(scope)} == {"ana", "lisbon"}
    assert len(graph.all_relations(other)) == 2 and len(graph.entities(other)) == 3
    # and so is the deleted entity's name embedding, in that scope only
    assert graph.embedded_keys(scope, ["ana", "lisbon", "chess"]) == {"ana", "lisbon"}
    assert graph.embedded_keys(other, ["ana", "lisbon", "chess"]) == {"ana", "lisbon", "chess"}
    # When the scope is deleted, its entities' name embeddings go with it; the other scope's stay
    graph.delete_scope(scope)
    assert graph.embedded_keys(scope, ["ana", "lisbon"]) == set()
    assert graph.embedded_keys(other, ["ana", "lisbon", "chess"]) == {"ana", "lisbon", "chess"}


@pytest.mark.timeout(240)
def test_a_write_touches_only_the_relations_it_names_and_the_entities_it_leaves_bare(graph: Any,
                                                                                   user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation
    from stores.graph import EntityWrite, GraphWrite

    scope = Scope(user_id=user_id)

    def write(**change: Any) -> None:
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=scope, when=datetime.now(timezone.utc), **change))

    gone = str(uuid.uuid4())
    lives = Relation(rid=str(uuid.uuid4()), source="ana", relationship="LIVES_IN", destination="lisbon",
                     memory_ids=[str(uuid.uuid4())])
    plays = Relation(rid=str(uuid.uuid4()), source="ana", relationship="PLAYS", destination="chess",
                     memory_ids=[gone])
    # (chess ends two relations that go together; bob and tennis are both left bare by one)
    likes = Relation(rid=str(uuid.uuid4()), source="lisbon", relationship="HOSTS", destination="chess",
                     memory_ids=[gone])
    tennis = Relation(rid=str(uuid.uuid4()), source="bob", relationship="PLAYS", destination="tennis",
                      memory_ids=[gone])
    # Given a scope with relations and an entity a job mentioned without any relation
    write(entities=[EntityWrite(k, k.title(), "thing", [0.5] * 384)
                    for k in ("ana", "lisbon", "chess", "porto", "bob", "tennis")],
          relations=[lives, plays, likes, tennis])
    # When a later job contradicts one relation, named as the decider read it (display name, not key), and
    # deletes the memory behind the other
    shown = Relation(rid=lives.rid, source="  Ana. ", relationship="LIVES_IN", destination="Lisbon")
    write(invalidated=[shown], deleted_memory_ids=[gone])
    # Then the contradicted relation is found from its source and kept as invalid, the unsupported one goes
    # with the entity it left bare, and the entity that never had a relation stays (forgetting sweeps only
    # the endpoints of what it deleted)
    assert {(r.relationship, r.valid) for r in graph.all_relations(scope, include_invalid=True)} == {
        ("LIVES_IN", False)}
    assert {e["key"] for e in graph.entities(scope)} == {"ana", "lisbon", "porto"}
    assert graph.embedded_keys(scope, ["ana", "lisbon", "chess", "porto", "bob", "tennis"]) == {
        "ana", "lisbon", "porto"}


@pytest.mark.timeout(240)
def test_name_embeddings_an_earlier_memq_kept_on_nodes_move_to_the_entity_collection(graph: Any, user_id: str) -> None:
    # Given entities written the earlier way: the name embedding a property of the node
    scope = Scope(user_id=user_id, agent_id="bot")
    key = scope.key()
    graph._run("UNWIND $rows AS r CREATE (n:__Entity__ {scope_key: $k, key: r.key, name: r.name, user_id: $u, "
               "agent_id: 'bot', created_at: '2024-05-01T10:00:00+00:00', embedding: r.e})",
               k=key, u=user_id, rows=[{"key": "ana", "name": "Ana", "e": [1.0] + [0.0] * 383},
                                       {"key": "porto", "name": "Porto", "e": [0.0, 1.0] + [0.0] * 382}])
    graph._run("MATCH (a:__Entity__ {scope_key: $k, key: 'ana'}), (p:__Entity__ {scope_key: $k, key: 'porto'}) "
               "CREATE (a)-[:MOVED_TO {valid: true, rid: 'r1', memory_ids: ['m1'], updated_at: '2024-05-01'}]->(p)",
               k=key)
    assert graph.embedded_keys(scope, ["ana", "porto"]) == set()
    # When a process starts on that graph (its first use runs the move)
    assert graph.move_name_embeddings(page=1) == 2
    # Then the embeddings are points of the exact scope, the nodes no longer carry them, and search finds
    # the relation through them (a query near Porto's vector that does not name it)
    assert graph.embedded_keys(scope, ["ana", "porto"]) == {"ana", "porto"}
    assert graph.embedded_keys(Scope(user_id=user_id), ["ana", "porto"]) == set()
    assert graph._run("MATCH (n:__Entity__ {scope_key: $k}) WHERE n.embedding IS NOT NULL RETURN n.key AS k",
                      k=key) == []
    found = graph.search(Scope(user_id=user_id), [0.1, 0.9] + [0.0] * 382, "where does she live now")
    assert [(r.source, r.relationship, r.destination) for r in found] == [("Ana", "MOVED_TO", "Porto")]
    # and another tenant's search finds nothing of it
    assert graph.search(Scope(user_id=user_id + "-x"), [0.1, 0.9] + [0.0] * 382, "ana porto") == []
    # and running it again moves nothing
    assert graph.move_name_embeddings() == 0


class _Noting:
    """The real Neo4j driver, noting every query a `GraphStore` sends through it (to EXPLAIN them after)."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def execute_query(self, query: str, params: dict[str, Any] | None = None, **options: Any) -> Any:
        self.sent.append((query, dict(params or {})))
        return self.driver.execute_query(query, params, **options)

    def session(self, **options: Any) -> Any:
        noting, real = self, self.driver.session(**options)

        class Session:
            def __enter__(self) -> Any:
                real.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return real.__exit__(*exc)

            def run(self, query: str, **params: Any) -> Any:
                noting.sent.append((query, params))
                return real.run(query, **params)

        return Session()


SCANS = ("AllNodesScan", "NodeByLabelScan", "NodeIndexScan", "UnionNodeByLabelsScan")
"""Plan operators that read every tenant's entities (a whole label, index or node store). A relation's MERGE
between two found ends is left out: Neo4j plans it as a scan of every relationship while a graph holds few."""


@pytest.mark.timeout(240)
def test_no_query_of_a_job_or_a_search_reads_other_tenants_entities(graph: Any, user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from memq.models import Relation
    from stores.graph import EntityWrite, GraphStore, GraphWrite

    def rel(source: str, kind: str, destination: str, memory: str) -> Relation:
        return Relation(rid=str(uuid.uuid4()), source=source, relationship=kind, destination=destination,
                        memory_ids=[memory])

    vector = [0.5] * 384
    entities = [EntityWrite(k, k.title(), "thing", vector) for k in ("ana", "lisbon", "porto", "chess")]
    # Given other tenants' graphs beside this one's
    for n in range(4):
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=Scope(user_id=f"{user_id}-other-{n}"),
                               when=datetime.now(timezone.utc), entities=entities,
                               relations=[rel("ana", "LIVES_IN", "lisbon", "m"), rel("ana", "PLAYS", "chess", "m")]))
    # When a store sends every query a job, a search and a deletion send (schema and the one-off moves aside)
    store = GraphStore(_Noting(graph._driver), graph.names, graph._database)
    store._ready = True
    scope, gone = Scope(user_id=user_id, agent_id="bot"), str(uuid.uuid4())
    lives, plays = rel("ana", "LIVES_IN", "lisbon", "kept"), rel("ana", "PLAYS", "chess", gone)
    store.write(GraphWrite(job_id=str(uuid.uuid4()), scope=scope, when=datetime.now(timezone.utc),
                           entities=entities, relations=[lives, plays]))
    store.write(GraphWrite(job_id=str(uuid.uuid4()), scope=scope, when=datetime.now(timezone.utc),
                           entities=entities[:3], relations=[rel("ana", "LIVES_IN", "porto", "new")],
                           invalidated=[lives], deleted_memory_ids=[gone]))
    store.relations_of(scope, ["ana", "porto"])
    store.search(scope, vector, "where does ana live")
    store.search(Scope(user_id=user_id), vector, "porto")
    store.all_relations(scope, include_invalid=True)
    store.relations(Scope(agent_id="bot"))
    store.entities(scope)
    store.forget_memories(scope, ["new"])
    store.delete_scope(scope)
    sent = store._driver.sent
    assert len(sent) == 10
    # Then Neo4j finds their entities by seeks of the scope's keys, never reading every tenant's entities
    # (a whole index or label): on a graph this small its planner scans an index without the seek hints
    # (a plain USING INDEX hint it met with a scan of the whole index in 2 runs of 3)
    for query, params in sent:
        plan = graph._driver.execute_query("EXPLAIN " + query, params).summary.plan
        operators, todo = [], [plan]
        while todo:
            step = todo.pop()
            operators.append(step["operatorType"])
            todo.extend(step.get("children", []))
        assert not [o for o in operators if o.split("@")[0].endswith(SCANS)], (query, operators)
    # and the deletion took this scope only
    assert graph.all_relations(Scope(user_id=f"{user_id}-other-0"), include_invalid=True) and not graph.entities(scope)


@pytest.mark.timeout(240)
def test_forgetting_names_spares_an_entity_a_later_job_merged_again(graph: Any, user_id: str) -> None:
    import uuid
    from datetime import datetime, timezone

    from stores.graph import EntityWrite, GraphWrite

    scope, other = Scope(user_id=user_id), Scope(user_id=user_id, agent_id="bot")
    # Given two entities with name points, one of which a later job merged again after an earlier job's
    # graph write had deleted it (so that job's finalize holds both keys as forgotten), and another scope
    # holding the same keys
    for target in (scope, other):
        graph.write(GraphWrite(job_id=str(uuid.uuid4()), scope=target, when=datetime.now(timezone.utc),
                               entities=[EntityWrite(k, k.title(), "thing", [0.5] * 384) for k in ("ann", "pixel")]))
    graph._run("MATCH (e:__Entity__ {scope_key: $k, key: 'pixel'}) DETACH DELETE e", k=scope.key())
    # When the earlier job's finalize forgets both names
    removed = graph.forget_names(scope, ["ann", "pixel"])
    # Then only the point of the entity still gone is removed; the merged-again one keeps its point
    assert removed == ["pixel"]
    assert graph.embedded_keys(scope, ["ann", "pixel"]) == {"ann"}
    # and the other scope's points and entities are untouched
    assert graph.embedded_keys(other, ["ann", "pixel"]) == {"ann", "pixel"}
    assert {e["key"] for e in graph.entities(other)} == {"ann", "pixel"}

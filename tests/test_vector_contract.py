"""One contract for every vector store backend, each against its real engine.

- ``edge``: Qdrant Edge in this process (the embedded default), always.
- ``qdrant-client``: the production adapter (`QdrantClientStore`) over qdrant-client's local mode, always.
- ``server``: the same adapter against a Qdrant server, where ``MEMQ_TEST_QDRANT_URL`` names one.
- ``remote``: an Edge store read and written by another client through its owner over the session's
  real Redis (`VectorServer` / `RemoteVectorStore`), so the wire format keeps the contract too.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import replace
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cli.redis_server import RedisServer
from memq.errors import InvalidFilter, StoreError
from memq.filters import evaluate, parse_filters
from memq.models import Scope
from stores.edge import open_edge
from stores.vector_rpc import RemoteVectorStore, VectorServer
from stores.occurred import TimeRange
from stores.vectors import MemoryPoint, VectorStore

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
DIMS = 4
BACKENDS = ["edge", "qdrant-client", "server", "remote"]


def _point(i: int, scope: Scope, *, metadata: dict[str, object] | None = None, minutes: int = 0,
           vector: list[float] | None = None) -> MemoryPoint:
    if vector is None:
        vector = [0.0] * DIMS
        vector[i % DIMS] = 1.0
    return MemoryPoint(id=str(uuid.UUID(int=i + 1)), vector=vector, memory=f"memory {i}", scope=scope,
                       created_at=NOW + timedelta(minutes=minutes), updated_at=None,
                       metadata=metadata if metadata is not None else {"n": i}, actor_id=None, role="user",
                       source_message_ids=[str(i)], job_id="job")


def _qdrant_client_store(tmp_path: Path, url: str | None) -> VectorStore:
    from qdrant_client import QdrantClient

    from stores.qdrant import QdrantClientStore

    if url is None:
        return QdrantClientStore(QdrantClient(path=str(tmp_path / "local")), "contract", DIMS, threading.RLock())
    collection = f"contract-{uuid.uuid4().hex[:8]}"
    return QdrantClientStore(QdrantClient(url=url), collection, DIMS, indexed=True)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    backend = request.param
    if backend == "edge":
        edge = open_edge(tmp_path / "edge", "contract", DIMS)
        yield edge
        edge.close()
    elif backend == "qdrant-client":
        local = _qdrant_client_store(tmp_path, None)
        yield local
        local.close()
    elif backend == "server":
        url = os.environ.get("MEMQ_TEST_QDRANT_URL")
        if not url:
            pytest.skip("no Qdrant server (set MEMQ_TEST_QDRANT_URL to run the contract against one)")
        server_store = _qdrant_client_store(tmp_path, url)
        yield server_store
        server_store.close()
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        owned = open_edge(tmp_path / "edge", "contract", DIMS)
        key = f"memq:vectors:test-{uuid.uuid4().hex[:8]}"
        server = VectorServer(owned, redis_server.url, key)
        server.start()
        remote = RemoteVectorStore(redis_server.url, key, tmp_path / "edge", "contract", DIMS, timeout_s=5)
        yield remote
        remote.close()
        server.stop()
        owned.close()


def test_points_round_trip_with_mem0_payload_keys_and_scope_filtering(store: VectorStore) -> None:
    store.ensure_collection()
    ann, bob = Scope(user_id="ann"), Scope(user_id="bob")
    store.upsert([_point(0, ann), _point(1, ann), _point(2, bob)])
    store.upsert([_point(0, ann)])  # idempotent
    hits = store.search([1.0, 0.0, 0.0, 0.0], ann, limit=10)
    assert [h.memory for h in hits] == ["memory 0", "memory 1"] and {h.user_id for h in hits} == {"ann"}
    assert hits[0].score == pytest.approx(1.0) and hits[1].score == pytest.approx(0.0, abs=1e-6)
    assert hits[0].hash and hits[0].metadata == {"n": 0} and hits[0].source_message_ids == ["0"]
    assert hits[0].created_at == NOW and hits[0].role == "user"
    assert store.count(ann) == 2 and store.count(bob) == 1 and store.count() == 3


def test_reads_keep_mem0_semantics_and_exact_reads_see_only_the_exact_scope(store: VectorStore) -> None:
    store.ensure_collection()
    carol, carol_bot, bot = Scope(user_id="carol"), Scope(user_id="carol", agent_id="bot"), Scope(agent_id="bot")
    store.upsert([_point(0, carol), _point(4, carol_bot), _point(8, bot)])
    query = [[1.0, 0.0, 0.0, 0.0]]
    # Mem0's reads: every id given must match
    assert {h.memory for h in store.search_batch(query, carol, limit=10)[0]} == {"memory 0", "memory 4"}
    assert {h.memory for h in store.search_batch(query, bot, limit=10)[0]} == {"memory 4", "memory 8"}
    # A job's reads: the ids not given must be absent too
    assert [h.memory for h in store.search_batch(query, carol, limit=10, exact=True)[0]] == ["memory 0"]
    assert [h.memory for h in store.search_batch(query, bot, limit=10, exact=True)[0]] == ["memory 8"]
    assert [h.memory for h in store.search_batch(query, carol_bot, limit=10, exact=True)[0]] == ["memory 4"]


def test_metadata_filters_and_score_threshold(store: VectorStore) -> None:
    store.ensure_collection()
    ann = Scope(user_id="ann")
    store.upsert([_point(0, ann, metadata={"topic": "food"}), _point(1, ann, metadata={"topic": "work"}),
                  _point(2, ann, metadata={"topic": "travel", "n": 7})])
    query = [1.0, 1.0, 0.0, 0.0]
    assert [h.memory for h in store.search(query, ann, limit=10, filters={"topic": "food"})] == ["memory 0"]
    assert {h.memory for h in store.search(query, ann, limit=10, filters={"topic": ["food", "travel"]})} \
        == {"memory 0", "memory 2"}
    assert [h.memory for h in store.list(ann, filters={"n": 7})] == ["memory 2"]
    assert {h.memory for h in store.search(query, ann, limit=10, threshold=0.5)} == {"memory 0", "memory 1"}
    with pytest.raises(InvalidFilter, match="unknown operator 'nested'"):
        store.search(query, ann, limit=1, filters={"topic": {"nested": 1}})


MIXED = [  # (metadata, actor_id, minutes after NOW) of the points the filter contract runs over
    ({"topic": "food", "n": 1, "tags": ["tea", "cake"], "ok": True}, "Ann", 0),
    ({"topic": "Food court", "n": 2.5, "ok": False}, "Bob", 10),
    ({"topic": "travel", "n": 7, "city": "Lyon"}, "Ann", 20),
    ({"n": -3, "city": "lyon"}, None, 30),
    ({"topic": "work", "tags": ["desk"]}, "Cy", 40),
    ({}, "Bob", 50),
    ({"n": 1.0, "ok": 1}, "Cy", 60),
]

FILTERS = [
    {"topic": "food"}, {"topic": ["food", "work"]}, {"topic": "*"}, {"tags": "tea"}, {"ok": True}, {"ok": False},
    {"n": {"gte": 2}}, {"n": {"gt": 1, "lte": 7}}, {"n": {"lt": 0}}, {"n": {"eq": 2.5}}, {"n": 7},
    {"topic": {"ne": "food"}}, {"topic": {"nin": ["food", "travel"]}}, {"topic": {"in": ["travel"]}},
    {"topic": {"contains": "ood"}}, {"topic": {"icontains": "FOOD"}}, {"city": {"icontains": "LYON"}},
    {"actor_id": "Ann"}, {"actor_id": {"in": ["Bob", "Cy"]}}, {"actor_id": "*"},
    {"created_at": {"gte": (NOW + timedelta(minutes=20)).isoformat()}},
    {"created_at": {"gt": NOW.isoformat(), "lt": (NOW + timedelta(minutes=40)).isoformat()}},
    {"data": {"contains": "memory 1"}}, {"user_id": "*"}, {"user_id": "someone-else"},
    {"OR": [{"topic": "food"}, {"city": "*"}]}, {"AND": [{"actor_id": "Ann"}, {"n": {"gt": 1}}]},
    {"NOT": [{"topic": "*"}]}, {"NOT": [{"actor_id": "Bob"}, {"n": {"lt": 0}}]},
    {"OR": [{"topic": {"icontains": "COURT"}}, {"n": {"lt": 0}}]},
    {"NOT": [{"city": {"icontains": "LYON"}}]},
    {"actor_id": "Ann", "OR": [{"n": 1}, {"city": "Lyon"}], "NOT": [{"tags": "cake"}]},
    {"n": {"eq": 1.0}}, {"n": {"in": [1, 7]}}, {"n": {"ne": 1}}, {"n": {"nin": [1]}}, {"ok": 1},
    {"ok": {"ne": True}}, {"created_at": {"gte": "2024-01-02T08:34:05+05:30:15"}},
]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(f)[:60] for f in FILTERS])
def test_every_filter_selects_what_the_reference_semantics_select(store: VectorStore,
                                                                  filters: dict[str, object]) -> None:
    store.ensure_collection()
    ann, other = Scope(user_id="ann"), Scope(user_id="zed")
    points = [MemoryPoint(**{**_point(i, ann, metadata=meta, minutes=minutes).__dict__, "actor_id": actor})
              for i, (meta, actor, minutes) in enumerate(MIXED)]
    store.upsert(points + [_point(50, other, metadata={"topic": "food", "city": "Lyon"})])
    node = parse_filters(filters)
    expected = {p.memory for p in points if evaluate(node, p.payload())}

    assert {m.memory for m in store.list(ann, limit=100, filters=filters)} == expected
    assert {m.memory for m in store.search([0.5, 0.5, 0.5, 0.5], ann, limit=100, filters=filters)} == expected


def test_list_is_oldest_first_and_limited(store: VectorStore) -> None:
    store.ensure_collection()
    dan = Scope(user_id="dan")
    store.upsert([_point(i, dan, minutes=10 - i) for i in range(6)] + [_point(9, Scope(user_id="eve"))])
    listed = store.list(dan, limit=100)
    assert [m.memory for m in listed] == [f"memory {i}" for i in range(5, -1, -1)]
    assert len(store.list(dan, limit=4)) == 4


def test_a_needle_filtered_in_python_is_found_however_deep_it_lies(store: VectorStore) -> None:
    # booleans (on Edge) and icontains are checked in Python on what the store returns: the read keeps
    # asking for more candidates until it finds enough or the scope runs out, never stopping at a cap
    store.ensure_collection()
    hal = Scope(user_id="hal")
    store.upsert([_point(i, hal, metadata={"flag": i == 999, "note": "NEEDLE" if i == 999 else "hay"},
                         minutes=i) for i in range(1_000)])
    for filters in ({"flag": True}, {"note": {"icontains": "needle"}}):
        assert [m.memory for m in store.list(hal, limit=1, filters=filters)] == ["memory 999"]
        assert [m.memory for m in store.search([1.0, 0.0, 0.0, 0.0], hal, limit=1, filters=filters)] \
            == ["memory 999"]


def test_pages_are_the_oldest_first_and_stable_across_equal_times(store: VectorStore) -> None:
    store.ensure_collection()
    fay = Scope(user_id="fay")
    # 40 memories: ids in reverse time order (so scrolling by id is not oldest first), 12 of them at one
    # instant (a backfill writes many at once), plus another scope's
    minutes = [m if m < 10 or m >= 22 else 10 for m in range(40)]
    store.upsert([_point(100 - i, fay, metadata={"n": i % 3}, minutes=minutes[i]) for i in range(40)]
                 + [_point(7, Scope(user_id="gus"), minutes=-5)])
    everything = store.list(fay, limit=100)
    assert [m.created_at for m in everything] == sorted(m.created_at for m in everything)
    assert len({m.id for m in everything}) == 40

    pages = [store.list(fay, limit=7, offset=o) for o in range(0, 42, 7)]
    assert [m.id for page in pages for m in page] == [m.id for m in everything]
    assert store.list(fay, limit=5) == everything[:5]  # the oldest five, not the first five by id
    assert store.list(fay, limit=5, offset=40) == []
    filtered = store.list(fay, limit=100, filters={"n": 1})
    assert [m.id for o in range(0, 14, 4) for m in store.list(fay, limit=4, offset=o, filters={"n": 1})] \
        == [m.id for m in filtered]


def test_retrieve_and_delete_by_id_skip_missing_ids(store: VectorStore) -> None:
    store.ensure_collection()
    ann = Scope(user_id="ann")
    store.upsert([_point(0, ann), _point(1, ann)])
    missing = str(uuid.uuid4())
    assert [m.memory for m in store.retrieve([_point(1, ann).id, missing])] == ["memory 1"]
    store.delete([_point(0, ann).id, missing])
    assert store.retrieve([_point(0, ann).id]) == [] and store.count(ann) == 1
    assert store.retrieve([]) == [] and store.search_batch([], ann, limit=3) == []


def test_a_vector_of_the_wrong_size_is_a_store_error(store: VectorStore) -> None:
    store.ensure_collection()
    ann = Scope(user_id="ann")
    with pytest.raises(StoreError):
        store.upsert([_point(0, ann, vector=[1.0, 0.0])])
    with pytest.raises(StoreError):
        store.search([1.0, 0.0], ann, limit=3)
    assert store.count() == 0


def _said(i: int, scope: Scope, text: str, axis: int) -> MemoryPoint:
    vector = [0.0] * DIMS
    vector[axis] = 1.0
    return replace(_point(i, scope), memory=text, vector=vector)


E0 = [1.0, 0.0, 0.0, 0.0]


def test_a_hybrid_search_fuses_keyword_matches_the_dense_ranking_misses_within_the_scope(store: VectorStore) -> None:
    store.ensure_collection()
    ann, bob = Scope(user_id="ann"), Scope(user_id="bob")
    tea = _said(0, ann, "Ann likes green tea", axis=0)  # the dense match of the probe
    sax = _said(1, ann, "Ann plays the saxophone every Sunday", axis=1)  # cosine 0, the keyword match
    store.upsert([tea, sax, *[_said(2 + i, ann, f"Ann visited town {i}", axis=2 + i % 2) for i in range(4)],
                  _said(9, bob, "Bob sells saxophones", axis=0), _said(10, Scope(user_id="ann", agent_id="bot"),
                                                                 "the bot's trumpet note", axis=1)])
    # Dense only: the nearest memory
    assert [m.id for m in store.search(E0, ann, limit=1)] == [tea.id]
    # Hybrid: the saxophone memory ranks first in the fusion (first in BM25, stemmed; tied in dense),
    # and its score is still its cosine similarity to the probe
    fused = store.search(E0, ann, limit=1, text="Who plays saxophones?")
    assert [m.id for m in fused] == [sax.id] and fused[0].score == pytest.approx(0.0, abs=1e-6)
    # Only the scope's memories come back, however well another scope's match the keyword
    wide = store.search(E0, ann, limit=10, text="saxophone")
    assert {m.user_id for m in wide} == {"ann"} and sax.id in {m.id for m in wide}
    assert _point(9, bob).id not in {m.id for m in wide}
    # Mem0's reads cover ann's memories with an agent too; a job's exact reads do not
    trumpet = _point(10, ann).id
    assert trumpet in {m.id for m in store.search(E0, ann, limit=3, text="trumpet")}
    exact = store.search_batch([E0], ann, limit=3, exact=True, texts=["trumpet"])[0]
    assert {(m.user_id, m.agent_id) for m in exact} == {("ann", None)} and trumpet not in {m.id for m in exact}
    # A threshold still bounds the cosine similarity: the keyword-only match falls under it
    assert [m.id for m in store.search(E0, ann, limit=5, threshold=0.5, text="saxophone")] == [tea.id]
    # Filters narrow a hybrid search as a dense one
    assert store.search(E0, ann, limit=5, text="saxophone", filters={"n": 99}) == []
    # A query with no terms (stopwords only) is a dense search
    assert [m.id for m in store.search(E0, ann, limit=3, text="the of and")] \
        == [m.id for m in store.search(E0, ann, limit=3)]
    # A batch keeps one text per vector
    both = store.search_batch([E0, E0], ann, limit=1, texts=["saxophone", "tea"])
    assert [[m.id for m in hits] for hits in both] == [[sax.id], [tea.id]]
    with pytest.raises(StoreError):
        store.search_batch([E0, E0], ann, limit=1, texts=["saxophone"])


def _dated(i: int, scope: Scope, day: int | None) -> MemoryPoint:
    occurred = datetime(2023, 5, day, tzinfo=timezone.utc) if day is not None else None
    return replace(_point(i, scope, vector=[1.0, 0.0, 0.0, 0.0]), occurred_at=occurred)


def test_a_time_range_selects_by_occurred_at_in_scope_and_leaves_undated_memories_out(store: VectorStore) -> None:
    store.ensure_collection()
    ann, bob = Scope(user_id="ann"), Scope(user_id="bob")
    # Given ann's memories dated 1..5 May, one of hers without a date (written before grounding), and bob's on 3 May
    store.upsert([_dated(day, ann, day) for day in range(1, 6)] + [_dated(10, ann, None), _dated(20, bob, 3)])
    query = [1.0, 0.0, 0.0, 0.0]

    def days(**window: datetime | None) -> list[int | None]:
        hits = store.search(query, ann, limit=10, during=TimeRange(**window))
        return sorted(h.occurred_at.day if h.occurred_at else None for h in hits)  # type: ignore[type-var]

    # When ann searches with a range, after inclusive and before exclusive
    may = lambda d: datetime(2023, 5, d, tzinfo=timezone.utc)  # noqa: E731
    assert days(after=may(2), before=may(4)) == [2, 3]
    assert days(after=may(4)) == [4, 5]
    assert days(before=may(2)) == [1]
    # Then bob's memory on 3 May never shows, nor the undated one; limit counts matches only (one query)
    assert len(store.search(query, ann, limit=1, during=TimeRange(after=may(3)))) == 1
    # And without a range every memory of the scope comes back, the undated one with occurred_at None
    everything = store.search(query, ann, limit=10)
    assert len(everything) == 6 and [h.occurred_at for h in everything if h.id == _dated(10, ann, None).id] == [None]
    # And occurred_at round-trips on retrieve, in UTC, and is no metadata key
    got = store.retrieve([_dated(2, ann, 2).id])[0]
    assert got.occurred_at == may(2) and "occurred_at" not in got.metadata and "occurred_ts" not in got.metadata
    # And a range combines with filters in the same query
    assert [h.metadata["n"] for h in store.search(query, ann, limit=10, filters={"n": {"gte": 3}},
                                                  during=TimeRange(before=may(5)))] in ([3, 4], [4, 3])


def test_a_time_range_with_after_not_before_before_is_refused() -> None:
    may = datetime(2023, 5, 1, tzinfo=timezone.utc)
    with pytest.raises(StoreError):
        TimeRange(after=may, before=may)
    with pytest.raises(StoreError):
        TimeRange(after=datetime(2023, 5, 1))  # naive

"""The embedded vector store (Qdrant Edge): one owner per folder, reads from any process, upkeep.

Workers here are real ``memq worker`` processes on a Redis database of their own, so the session
worker (in this process, on database 0) never takes their tasks.
"""

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
from memories import Memories
from memq.config import Neo4jSettings, RedisSettings, Settings
from memq.errors import NoStoreOwner, StoreOwned
from memq.models import JobState, Scope
from producer import Producer
from stores.edge import open_edge
from stores.vector_open import close_vector_store
from stores.vectors import MemoryPoint
from tests.conftest import requires_locomo
from tests.helpers import locomo_sessions, until
from tests.rigs.workers import start_worker, stop_worker, wait_ready, worker_env


@pytest.fixture()
def own_db(redis_server: RedisServer) -> Iterator[str]:
    """A Redis database of this test's own (emptied before and after)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _settings(data: Path, url: str) -> Settings:
    return Settings(data_dir=data, redis=RedisSettings(url=url, socket_timeout_s=2), neo4j=Neo4jSettings())


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@requires_locomo
@pytest.mark.faults
@pytest.mark.timeout(400)
def test_other_processes_read_while_a_worker_ingests_and_a_second_worker_refuses_the_folder(
        own_db: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = worker_env(own_db, data)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    settings = _settings(data, own_db)
    producer = Producer(settings)
    reader = Memories(settings)
    try:
        wait_ready(worker, log)
        # Given this process's embedder loaded (a first search, of an empty scope: loading takes seconds)
        assert reader.search("anything", user_id="nobody-yet", limit=1)["results"] == []
        # And a worker ingesting a LoCoMo conversation (19 sessions, one after the other)
        receipts = producer.add_many(locomo_sessions("reader", "conv-26", 19))
        # When a `memq search` process starts now (its start-up overlaps the ingest; its search may land
        # after the last job) and this process searches once the first job is done
        cli_search = subprocess.Popen(
            [sys.executable, "-m", "cli", "search", "What does Caroline do?", "--user-id", "reader", "--limit", "5",
             "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        until(lambda: producer.wait(receipts[:1], timeout_s=0)[0].done, 180, "the first job")
        found = reader.search("What does Caroline do?", user_id="reader", limit=5)["results"]
        unfinished = sum(not s.done for s in producer.wait(receipts, timeout_s=0))
        out, err = cli_search.communicate(timeout=120)
        # Then both get the scope's memories, through the worker that owns the store, this process's
        # while the worker was still ingesting
        assert unfinished > 0, "this process's search should have run while the worker was ingesting"
        assert found and {r["user_id"] for r in found} == {"reader"}
        assert cli_search.returncode == 0, err[-2000:]
        from_cli = json.loads(out)["results"]
        assert from_cli and {r["user_id"] for r in from_cli} == {"reader"}
        # When a second worker starts on the same folder
        second_log = tmp_path / "second.log"
        second = start_worker(env, second_log)
        returncode = second.wait(120)
        # Then it refuses before consuming anything, naming the folder and the owning worker
        text = second_log.read_text(errors="replace")
        assert returncode != 0 and StoreOwned.__name__ in text, text[-2000:]
        assert str(data / "qdrant") in text and f"process {worker.pid}" in text and " ready." not in text
        # And every job still ends succeeded (none was taken by the refused worker)
        statuses = producer.wait(receipts, timeout_s=240, poll_s=0.2)
        assert [s.status for s in statuses] == [JobState.SUCCEEDED] * len(receipts)
        # And id-based reads from other processes work and keep the scope
        top = reader.search("Caroline", user_id="reader", limit=1)["results"][0]
        got = _cli(env, "get", top["id"], "--user-id", "reader", "--json")
        assert got.returncode == 0 and json.loads(got.stdout)["memory"] == top["memory"], got.stderr[-2000:]
        assert json.loads(_cli(env, "get", top["id"], "--user-id", "intruder", "--json").stdout) is None
        history = _cli(env, "history", top["id"], "--user-id", "reader", "--json")
        assert history.returncode == 0 and json.loads(history.stdout)[0]["memory_id"] == top["id"]
        everything = reader.get_all(user_id="reader", limit=1000)["results"]
        assert reader.vectors.count(Scope(user_id="reader")) == len(everything) > 0
    finally:
        stop_worker(worker)
        producer.close()
    # And once the worker has stopped, a reader is told that no worker owns the store
    started = time.monotonic()
    with pytest.raises(NoStoreOwner, match=str(data / "qdrant")):
        Memories(settings).search("Caroline", user_id="reader")
    assert time.monotonic() - started < 60
    # While a command that may open the folder itself (the CLI) reads the same memories
    opened = Memories(settings, open_embedded=True)
    try:
        assert {m["id"] for m in opened.get_all(user_id="reader", limit=1000)["results"]} == {m["id"] for m in everything}
    finally:
        close_vector_store(opened.vectors)  # only this folder's: the session worker's store stays open


@requires_locomo
@pytest.mark.faults
@pytest.mark.timeout(400)
def test_model_stages_scale_out_to_prefork_workers_that_read_the_store_through_its_owner(
        own_db: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = worker_env(own_db, data)
    model_log, owner_log = tmp_path / "model.log", tmp_path / "owner.log"
    # Given a prefork worker (2 children) of the start and model stages only, started before any owner
    model = start_worker(env, model_log, pool="prefork", queues="memq.light,memq.llm", concurrency=2)
    owner = None
    producer = Producer(_settings(data, own_db))
    try:
        wait_ready(model, model_log)
        assert "no worker owns the embedded vector store" in model_log.read_text(errors="replace")
        # And a thread-pool worker of the store writes only, which owns the folder
        owner = start_worker(env, owner_log, queues="memq.write")
        wait_ready(owner, owner_log)
        # When three sessions are added, then the same three again (other idempotency keys)
        sessions = locomo_sessions("scaled", "conv-26", 3)
        first = producer.add_many(sessions)
        again = producer.add_many([{**r, "idempotency_key": f"again:{r['idempotency_key']}"} for r in sessions])
        statuses = producer.wait(first + again, timeout_s=300, poll_s=0.2)
        # Then every job succeeds, and the second round's decisions saw the first round's memories,
        # which the model worker's children read through the owner: nothing is added twice
        assert [s.status for s in statuses] == [JobState.SUCCEEDED] * 6, [s.error for s in statuses]
        added = sum(s.counts.get("ADD", 0) for s in statuses[:3])
        assert added > 0 and sum(s.counts.get("ADD", 0) for s in statuses[3:]) == 0
        memories = Memories(_settings(data, own_db)).get_all(user_id="scaled", limit=1000)["results"]
        texts = [m["memory"] for m in memories]
        assert len(texts) == len(set(texts)) == added
        # And the model stages ran only in the model worker, the writes only in the owner
        model_text, owner_text = model_log.read_text(errors="replace"), owner_log.read_text(errors="replace")
        for task in ("memq.start", "memq.extract", "memq.decide"):
            assert f"{task}[" in model_text and f"{task}[" not in owner_text, task
        assert "memq.write_vectors[" in owner_text and "memq.write_vectors[" not in model_text
        assert StoreOwned.__name__ not in model_text + owner_text
        # When the owner stops and a job is added meanwhile
        stop_worker(owner)
        owner = None
        late = producer.add_many(locomo_sessions("scaled", "conv-26", 4)[3:])
        # Then it waits in decide for the owner, longer than its five attempts would last (backoff capped
        # at 4 s here), without failing
        until(lambda: "waits for the embedded vector store's owner" in model_log.read_text(errors="replace"),
              120, "the decide stage to wait for the owner")
        time.sleep(25)
        assert not producer.wait(late, timeout_s=0)[0].done
        # And it succeeds once an owner is back
        owner = start_worker(env, owner_log, queues="memq.write")
        wait_ready(owner, owner_log)
        [status] = producer.wait(late, timeout_s=180, poll_s=0.2)
        assert status.status is JobState.SUCCEEDED and status.counts.get("ADD", 0) > 0, status.error
    finally:
        producer.close()
        for proc in (model, owner):
            if proc is not None:
                stop_worker(proc)


def test_worker_refuses_unknown_queues_and_a_prefork_owner_of_the_embedded_store(tmp_path: Path) -> None:
    env = worker_env("redis://127.0.0.1:9/0", tmp_path / "data")
    # A queue memq does not have: refused before Celery starts, naming the queues there are
    typo = _cli(env, "worker", "--queues", "memq.llm,memq.wrte")
    assert typo.returncode == 2 and "memq.wrte" in typo.stdout and "memq.write" in typo.stdout
    # Prefork children would each open the embedded folder when they consume the writes
    prefork = _cli(env, "worker", "--pool", "prefork", "--concurrency", "2", "--queues", "memq.write")
    assert prefork.returncode == 2 and "memq.llm" in prefork.stdout


def test_history_reads_only_sql_and_loads_no_vector_store_or_embedder(tmp_path: Path, own_db: str) -> None:
    code = ("import sys, json; from pathlib import Path; from memq.config import Settings, RedisSettings;"
            "from memories import Memories;"
            f"m = Memories(Settings(data_dir=Path({str(tmp_path)!r}), redis=RedisSettings(url={own_db!r})));"
            "print(json.dumps(m.history('00000000-0000-0000-0000-000000000001', user_id='u')));"
            "print([x for x in ('qdrant_edge', 'qdrant_client', 'torch', 'sentence_transformers', 'litellm', 'neo4j')"
            " if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_vacuum_drops_deleted_points_and_keeps_every_live_one(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    store = open_edge(tmp_path / "q", "vac", 4)
    try:
        now = datetime(2024, 1, 1, tzinfo=timezone.utc)
        points = [MemoryPoint(id=f"00000000-0000-0000-0000-{i:012d}", vector=[1.0, float(i % 7), 0.0, 1.0],
                              memory=f"m{i}", scope=Scope(user_id=f"u{i % 3}"), created_at=now, updated_at=None,
                              metadata={}, actor_id=None, role=None, source_message_ids=[], job_id="j")
                  for i in range(3000)]
        store.upsert(points)
        store.delete([p.id for p in points[:2500]])  # churn past the vacuum's threshold
        assert len(store.vacuums) == 1, "a vacuum should run after enough deletes"
        assert store.count() == 500 and store.count(Scope(user_id="u1")) == sum(i % 3 == 1 for i in range(2500, 3000))
        live = {p.id for p in points[2500:]}
        assert {m.id for s in ("u0", "u1", "u2") for m in store.list(Scope(user_id=s), limit=1000)} == live
        hits = store.search([1.0, 3.0, 0.0, 1.0], Scope(user_id="u0"), limit=5)
        assert len(hits) == 5 and all(h.id in live for h in hits)
    finally:
        store.close()


def test_the_owner_survives_malformed_requests_and_answers_the_next_reader(
        tmp_path: Path, redis_server: RedisServer) -> None:
    from stores.vector_rpc import RemoteVectorStore, VectorServer

    store = open_edge(tmp_path / "q", "rpc", 4)
    key = "memq:vectors:test-malformed"
    server = VectorServer(store, redis_server.url, key)
    server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        # Given garbage, an unknown operation and a request with bad arguments in the owner's queue
        reply = f"{key}:reply:bad-op"
        client.rpush(f"{key}:requests", b"{not json", json.dumps({"op": "drop_everything", "args": {},
                                                                  "reply": reply, "deadline": 2**62}),
                     json.dumps({"op": "count", "args": {"scope": {"user_id": ""}}, "reply": f"{key}:reply:bad-args",
                                 "deadline": 2**62}))
        # Then each answerable one gets an error, never a result
        for name in ("bad-op", "bad-args"):
            popped = client.blpop([f"{key}:reply:{name}"], timeout=10)
            assert popped is not None and json.loads(popped[1])["error"] == "StoreError"
        # And the next reader is served as usual
        reader = RemoteVectorStore(redis_server.url, key, tmp_path / "q", "rpc", 4, timeout_s=5)
        assert reader.count() == 0
        reader.close()
    finally:
        server.stop()
        store.close()
        client.close()


def _memory(i: int, text: str, vector: list[float]) -> MemoryPoint:
    from datetime import datetime, timezone

    return MemoryPoint(id=f"00000000-0000-0000-0000-{i:012d}", vector=vector, memory=text,
                       scope=Scope(user_id="ann"), created_at=datetime(2024, 1, 1, tzinfo=timezone.utc),
                       updated_at=None, metadata={}, actor_id=None, role=None, source_message_ids=[], job_id="j")


def test_a_shard_written_before_hybrid_retrieval_gets_bm25_terms_at_its_next_open(tmp_path: Path) -> None:
    import qdrant_edge as qe

    from stores.edge import SPARSE_PENDING, _config, has_sparse

    # Given a shard as memq wrote it before hybrid retrieval: dense vectors only, 1,500 points
    folder = tmp_path / "q" / "old"
    shard = qe.EdgeShard.create(str(folder), _config(4, sparse=False))
    points = [_memory(i, f"Ann visited town number {i}", [1.0, 0.0, 0.0, 0.0]) for i in range(1499)]
    points.append(_memory(1499, "Ann plays the saxophone", [0.0, 1.0, 0.0, 0.0]))
    shard.update(qe.UpdateOperation.upsert_points([qe.Point(p.id, list(p.vector), p.payload()) for p in points]))
    shard.close()
    assert not has_sparse(folder)
    # When memq opens it
    store = open_edge(tmp_path / "q", "old", 4)
    try:
        # Then the shard has the sparse vector, every point has its terms, and the marker is gone
        assert has_sparse(folder) and not (folder / SPARSE_PENDING).exists()
        # (the keyword match ties the best dense match in the fusion: 1/2 each, the second dense 1/3)
        hits = store.search([1.0, 0.0, 0.0, 0.0], Scope(user_id="ann"), limit=2, text="saxophone")
        assert points[-1].id in {h.id for h in hits}
        records = store.shard.retrieve([p.id for p in points], with_payload=False, with_vector=True)
        assert len(records) == 1500 and all(isinstance(r.vector, dict) and r.vector["bm25"].indices for r in records)
        # And a new point is written with its terms as usual
        store.upsert([_memory(2000, "Ann bought a cello", [0.0, 0.0, 1.0, 0.0])])
        assert "Ann bought a cello" in {h.memory for h in store.search([1.0, 0.0, 0.0, 0.0], Scope(user_id="ann"),
                                                                        limit=2, text="cello")}
    finally:
        store.close()
    # And an open interrupted before the terms were all written (the marker left behind) writes them again
    shard = qe.EdgeShard.load(str(folder), _config(4))
    shard.update(qe.UpdateOperation.update_vectors([qe.PointVectors(points[-1].id, {"bm25": qe.SparseVector([], [])})]))
    shard.close()
    (folder / SPARSE_PENDING).touch()
    store = open_edge(tmp_path / "q", "old", 4)
    try:
        assert not (folder / SPARSE_PENDING).exists()
        hits = store.search([1.0, 0.0, 0.0, 0.0], Scope(user_id="ann"), limit=2, text="saxophone")
        assert points[-1].id in {h.id for h in hits}
    finally:
        store.close()


def test_a_server_collection_without_the_sparse_vector_is_searched_dense_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from qdrant_client import QdrantClient
    from qdrant_client import models as qm

    from stores.qdrant import QdrantClientStore

    # Given a collection created before hybrid retrieval (qdrant-client's local mode stands in for a server)
    client = QdrantClient(path=str(tmp_path / "local"))
    client.create_collection("old", vectors_config=qm.VectorParams(size=4, distance=qm.Distance.COSINE))
    store = QdrantClientStore(client, "old", 4, threading.RLock())
    try:
        tea = _memory(1, "Ann likes green tea", [1.0, 0.0, 0.0, 0.0])
        sax = _memory(2, "Ann plays the saxophone", [0.0, 1.0, 0.0, 0.0])
        with caplog.at_level("WARNING", logger="stores.qdrant"):
            store.upsert([tea, sax])
        # Then writes and searches work, dense only, and the operator is told why
        assert not store.sparse and "dense vectors only" in caplog.text
        assert [h.id for h in store.search([1.0, 0.0, 0.0, 0.0], Scope(user_id="ann"), limit=1,
                                           text="saxophone")] == [tea.id]
    finally:
        store.close()

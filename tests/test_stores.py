"""Stores against their real engines: Qdrant local mode and SQLite."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from memq.config import QdrantSettings
from memq.errors import InvalidRequest, StoreError, StoreUnavailable
from memq.models import Scope
from stores.history import HistoryRecord, open_history_store
from stores.qdrant import MemoryPoint, VectorStore, close_vector_store, open_vector_store

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _point(i: int, user: str, dims: int = 4) -> MemoryPoint:
    vector = [0.0] * dims
    vector[i % dims] = 1.0
    return MemoryPoint(id=f"00000000-0000-0000-0000-{i:012d}", vector=vector, memory=f"memory {i}",
                       scope=Scope(user_id=user), created_at=NOW, updated_at=None, metadata={"n": i},
                       actor_id=None, role="user", source_message_ids=[str(i)], job_id="job")


@pytest.fixture()
def store(tmp_path: Path) -> VectorStore:
    s = open_vector_store(QdrantSettings(path=tmp_path / "q", collection="t"), dims=4)
    yield s
    close_vector_store(s)  # only this test's store: the session worker's stays open


def test_points_round_trip_with_mem0_payload_keys_and_scope_filtering(store: VectorStore) -> None:
    store.upsert([_point(0, "ann"), _point(1, "ann"), _point(2, "bob")])
    store.upsert([_point(0, "ann")])  # idempotent
    hits = store.search([1.0, 0.0, 0.0, 0.0], Scope(user_id="ann"), limit=10)
    assert [h.memory for h in hits][:1] == ["memory 0"] and {h.user_id for h in hits} == {"ann"}
    assert hits[0].hash and hits[0].metadata == {"n": 0} and hits[0].source_message_ids == ["0"]
    assert store.count(Scope(user_id="ann")) == 2
    with pytest.raises(InvalidRequest, match="reserved"):
        store.search([1.0, 0, 0, 0], Scope(user_id="ann"), limit=1, filters={"data": "x"})


def test_a_collection_with_another_vector_size_is_refused(tmp_path: Path) -> None:
    first = open_vector_store(QdrantSettings(path=tmp_path / "q", collection="t"), dims=4)
    first.ensure_collection()
    close_vector_store(first)
    second = open_vector_store(QdrantSettings(path=tmp_path / "q", collection="t"), dims=8)
    with pytest.raises(StoreError, match="size 4"):
        second.ensure_collection()
    close_vector_store(second)


def test_a_second_process_cannot_open_the_embedded_store_and_is_told_why(store: VectorStore, tmp_path: Path) -> None:
    store.ensure_collection()
    code = ("from memq.config import QdrantSettings; from stores.qdrant import open_vector_store\n"
            f"open_vector_store(QdrantSettings(path={str(tmp_path / 'q')!r}, collection='t'), dims=4)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert StoreUnavailable.__name__ in out.stderr and "worker owns it" in out.stderr


def test_history_rows_are_written_once_per_id(tmp_path: Path) -> None:
    history = open_history_store(f"sqlite:///{tmp_path / 'h.db'}")
    row = HistoryRecord(id="r1", memory_id="m1", new_memory="x", event="ADD", created_at=NOW, job_id="j")
    history.add([row])
    history.add([HistoryRecord(**row.model_dump())])
    assert [(h.event.value, h.new_memory) for h in history.history("m1")] == [("ADD", "x")]

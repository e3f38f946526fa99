"""``memq migrate-store``: a vector store written by an older memq (qdrant-client local mode) is refused
until migrated, then copied point for point into the embedded Edge store, its old files kept aside.

Real engines: the old store is written by `qdrant-client` local mode through memq's own
`QdrantClientStore`, the new one read through Qdrant Edge; the command runs as a process.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import qdrant_edge as qe
from qdrant_client import QdrantClient

from memq.config import QdrantSettings
from memq.errors import StoreError, StoreNeedsMigration, StoreOwned
from memq.models import Scope
from stores.edge import is_local_mode_folder, open_edge
from stores.migrate import inspect_local_mode, migrate_local_mode
from stores.qdrant import QdrantClientStore
from stores.sparse import SPARSE_NAME, document_terms
from stores.vector_open import open_vector_store
from stores.vectors import MemoryPoint

DIMS = 8
ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob", agent_id="helper")


@dataclass
class OldStore:
    """A data folder whose vector store is in qdrant-client local mode, and what it holds."""

    data: Path
    root: Path
    points: dict[str, dict[str, MemoryPoint]]
    """Collection -> point id -> point."""
    expected_hits: dict[tuple[str, str], list[str]]
    """(scope's user, probe point id) -> ids local mode returned for a search with that point's vector."""


def _vector(rng: random.Random) -> list[float]:
    return [rng.uniform(-1, 1) for _ in range(DIMS)]


def _points(rng: random.Random, scope: Scope, n: int, tag: str) -> list[MemoryPoint]:
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    return [MemoryPoint(
        id=str(uuid.UUID(int=rng.getrandbits(128))), vector=_vector(rng), memory=f"{tag} memory {i}", scope=scope,
        created_at=start + timedelta(minutes=i), updated_at=start + timedelta(days=1) if i % 3 == 0 else None,
        metadata={"topic": f"t{i % 4}", "n": i, "nested": {"tags": ["a", "b"]}}, actor_id="Caroline" if i % 2 else None,
        role="user", source_message_ids=[str(i), f"m{i}"], job_id=f"job-{i // 10}") for i in range(n)]


def _write_old_store(root: Path, collection: str, points: list[MemoryPoint], dims: int = DIMS) -> QdrantClientStore:
    store = QdrantClientStore(QdrantClient(path=str(root)), collection, dims, threading.RLock())
    store.ensure_collection()
    for start in range(0, len(points), 100):
        store.upsert(points[start:start + 100])
    return store


@pytest.fixture(scope="module")
def _old_store_template(tmp_path_factory: pytest.TempPathFactory) -> OldStore:
    """~300 memories of two scopes in collection ``memq`` and 12 in ``other``, written by local mode (once)."""
    rng = random.Random(7)
    data = tmp_path_factory.mktemp("template") / "data"
    root = data / "qdrant"
    memq_points = _points(rng, ALICE, 180, "alice") + _points(rng, BOB, 120, "bob")
    other_points = _points(rng, ALICE, 12, "other")
    store = _write_old_store(root, "memq", memq_points)
    expected: dict[tuple[str, str], list[str]] = {}
    for scope, probe in ((ALICE, memq_points[5]), (ALICE, memq_points[77]), (BOB, memq_points[200])):
        expected[(str(scope.user_id), probe.id)] = [h.id for h in store.search(probe.vector, scope, limit=5)]
    store.close()
    _write_old_store(root, "other", other_points).close()
    return OldStore(data, root, {"memq": {p.id: p for p in memq_points}, "other": {p.id: p for p in other_points}},
                    expected)


@pytest.fixture()
def old_store(_old_store_template: OldStore, tmp_path: Path) -> OldStore:
    """A copy of the local-mode data folder of `_old_store_template` for one test."""
    data = tmp_path / "data"
    shutil.copytree(_old_store_template.data, data)
    return OldStore(data, data / "qdrant", _old_store_template.points, _old_store_template.expected_hits)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with its content's hash: what "unchanged" means here."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _local_mode_files(snapshot: dict[str, str]) -> dict[str, str]:
    """The part of a `_snapshot` that is the local-mode store (Edge rewrites its own files on loading)."""
    return {k: v for k, v in snapshot.items() if k.split("/")[0] in ("meta.json", "collection", ".lock")}


def _cli(data: Path, *args: str, dims: int = DIMS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")}
    env.update({"MEMQ_DATA_DIR": str(data), "MEMQ_EMBEDDER__DIMS": str(dims), "COLUMNS": "200"})
    return subprocess.run([sys.executable, "-m", "cli", "migrate-store", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=data.parent)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unit(vector: Any) -> list[float]:
    norm = math.sqrt(sum(float(x) ** 2 for x in vector))
    return [float(x) / norm for x in vector]


def test_a_local_mode_folder_is_refused_until_migrated_and_left_as_it_was(old_store: OldStore) -> None:
    # Given a data folder written by memq before the Edge store
    before = _snapshot(old_store.root)
    assert is_local_mode_folder(old_store.root)
    # When memq opens it, directly or as the process's vector store
    with pytest.raises(StoreNeedsMigration) as direct:
        open_edge(old_store.root, "memq", DIMS)
    with pytest.raises(StoreNeedsMigration) as opened:
        open_vector_store(QdrantSettings(path=old_store.root), DIMS)
    # Then it is told to run the migration, and nothing in the folder changed
    assert "memq migrate-store" in str(direct.value) and "memq migrate-store" in str(opened.value)
    # And a dry run lists what would be copied, still changing nothing
    found = inspect_local_mode(old_store.root, DIMS)
    assert [(c.name, c.dims, c.points) for c in found] == [("memq", DIMS, 300), ("other", DIMS, 12)]
    assert _snapshot(old_store.root) == before


def test_migrate_store_copies_every_point_into_edge_and_keeps_the_old_files(old_store: OldStore) -> None:
    old_files = {k: v for k, v in _snapshot(old_store.root).items() if k != ".lock"}
    # When the operator runs `memq migrate-store`
    run = _cli(old_store.data)
    # Then it succeeds with a line per collection and the backup's place
    assert run.returncode == 0, run.stdout + run.stderr
    out = _one_line(run.stdout)
    assert f"collection 'memq': 300 points copied into {old_store.root / 'memq'}" in out
    assert f"collection 'other': 12 points copied into {old_store.root / 'other'}" in out
    backups = list(old_store.root.glob("local-mode-backup-*"))
    assert len(backups) == 1 and f"old files kept in {backups[0]}" in out
    # And the old files are in the backup, byte for byte, and the folder no longer reads as local mode
    assert {k: v for k, v in _snapshot(backups[0]).items() if k != ".lock"} == old_files
    assert not is_local_mode_folder(old_store.root)
    # And every point reads back through Edge: id, payload, (normalized) vector and its text's BM25 terms
    for collection, points in old_store.points.items():
        store = open_edge(old_store.root, collection, DIMS)
        try:
            records = store.shard.retrieve(list(points), with_payload=True, with_vector=True)
            assert {str(r.id) for r in records} == set(points) and store.count() == len(points)
            for r in records:
                point = points[str(r.id)]
                assert r.payload == point.payload()
                assert isinstance(r.vector, dict)
                assert r.vector[""] == pytest.approx(_unit(point.vector), abs=1e-5)
                terms = r.vector[SPARSE_NAME]
                assert isinstance(terms, qe.SparseVector) and terms.indices
                assert (list(terms.indices), list(terms.values)) == document_terms(point.memory)
            if collection == "memq":
                # And each scope counts the same memories, and a search finds the same ones as before
                assert store.count(ALICE) == 180 and store.count(BOB) == 120
                for (user, probe), hits in old_store.expected_hits.items():
                    scope = ALICE if user == "alice" else BOB
                    assert [h.id for h in store.search(points[probe].vector, scope, limit=5)] == hits
                assert {i.memory for i in store.list(BOB, limit=500)} == {f"bob memory {i}" for i in range(120)}
        finally:
            store.close()
    # And a second run has nothing to migrate
    again = _cli(old_store.data)
    assert again.returncode == 0 and "nothing to migrate" in _one_line(again.stdout)


def test_a_mismatched_vector_size_is_refused_and_changes_nothing(old_store: OldStore) -> None:
    before = _snapshot(old_store.root)
    # When the embedder makes 16 floats but the old store holds 8
    run = _cli(old_store.data, dims=16)
    # Then the command refuses, naming the collection and the size, and nothing changed
    assert run.returncode == 1
    assert "StoreError" in run.stdout and "collection 'memq'" in run.stdout and "size 8" in run.stdout
    assert _snapshot(old_store.root) == before
    with pytest.raises(StoreError, match="size 8"):
        migrate_local_mode(old_store.root, 16)
    assert _snapshot(old_store.root) == before


def test_an_edge_shard_already_holding_points_is_not_overwritten(tmp_path: Path) -> None:
    # Given an Edge shard ``memq`` with a memory, and beside it a local-mode store with a collection ``memq``
    root = tmp_path / "qdrant"
    rng = random.Random(3)
    edge = open_edge(root, "memq", DIMS)
    edge.upsert(_points(rng, ALICE, 1, "edge"))
    edge.close()
    _write_old_store(root, "memq", _points(rng, ALICE, 5, "old")).close()
    before = _snapshot(root)
    # When migrating, then it is refused before the old files move, and the shard keeps its one memory
    with pytest.raises(StoreError, match="already holds 1 points"):
        migrate_local_mode(root, DIMS)
    assert _local_mode_files(_snapshot(root)) == _local_mode_files(before)
    assert not list(root.glob("local-mode-backup-*"))
    shard = qe.EdgeShard.load(str(root / "memq"))
    try:
        assert shard.count(qe.CountRequest(exact=True)) == 1
    finally:
        shard.close()


def test_a_local_mode_store_open_elsewhere_is_refused(old_store: OldStore) -> None:
    # Given a holder of the local-mode folder (an older memq's worker; here another client in this process,
    # refused the same way since the lock is per open file)
    holder = QdrantClient(path=str(old_store.root))
    try:
        before = _snapshot(old_store.root)
        # When migrating, then it is refused and nothing changed
        with pytest.raises(StoreOwned, match="open in another process"):
            migrate_local_mode(old_store.root, DIMS)
        assert _snapshot(old_store.root) == before
    finally:
        holder.close()


def test_a_copy_failing_midway_puts_the_folder_back_as_it_was(old_store: OldStore) -> None:
    # Given an empty Edge shard ``other`` of another vector size (made while meta.json was aside): the copy
    # of ``memq`` succeeds, then opening ``other`` for size 8 fails after the old files were moved aside
    meta = old_store.root / "meta.json"
    meta.rename(meta.with_name("meta.aside"))
    open_edge(old_store.root, "other", 16).close()
    meta.with_name("meta.aside").rename(meta)
    before = _snapshot(old_store.root)
    # When migrating
    with pytest.raises(StoreError, match="size 16"):
        migrate_local_mode(old_store.root, DIMS)
    # Then the Edge shard it made is gone, the old files are back and the backup folder removed
    assert not (old_store.root / "memq").exists()
    assert not list(old_store.root.glob("local-mode-backup-*"))
    assert {k: v for k, v in _snapshot(old_store.root).items() if not k.startswith("other")} == \
        {k: v for k, v in before.items() if not k.startswith("other")}
    assert is_local_mode_folder(old_store.root)
    # And once the stray shard is out of the way, the migration goes through
    shutil.rmtree(old_store.root / "other")
    report = migrate_local_mode(old_store.root, DIMS)
    assert report.collections == ("memq", "other") and dict(report.points) == {"memq": 300, "other": 12}
    assert (report.backup / "meta.json").is_file() and (report.backup / "collection" / "memq").is_dir()
    store = open_edge(old_store.root, "other", DIMS)
    try:
        assert store.count() == 12
    finally:
        store.close()

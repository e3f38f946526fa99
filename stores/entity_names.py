"""Entity-name embeddings in the vector store: one point per entity of a scope, in their own collection.

The graph (`stores.graph`) keeps entities and relations in Neo4j; the embedding of each entity's name
lives here instead, as a point of the collection ``<memories collection>_entities`` on the same Qdrant
(a server, or the embedded Edge store in its own folder). Why not on the Neo4j node, as Mem0 does:

- a graph write then sends and stores no 384-float arrays (Neo4j keeps them as 8-byte doubles in its
  transaction log and property store): measured on this machine, a warm write of 11 entities, 7 of
  them new, and 3 relations took 4.6 ms with the arrays and 3.0 ms without (`bench/graph_backfill.py`);
- graph search asks a vector index for the entities nearest to the query instead of computing the
  cosine of every entity of the scope inside Cypher.

A point's id is a UUID derived from the entity's exact scope key and its name key, so a name is
embedded once per scope and a retried write rewrites the same point. Its payload is a memory's
(`stores.vectors.MemoryPoint`): ``data`` = the display name, the scope ids, ``created_at``, ``job_id``
and ``entity_key`` (the normalized name the Neo4j node is merged on). Reads filter by scope exactly as
memory reads do, so one tenant's names never answer another's query.

In the pipeline the job's vector write writes its name points (`pipeline.apply.write_vectors`), the
graph write only Neo4j, and finalize removes the points of entities the graph write deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from memq.config import Settings
from memq.models import Scope
from stores.vectors import MemoryPoint, VectorStore

__all__ = ["ENTITY_COLLECTION_SUFFIX", "EntityNames", "NameHit", "open_entity_names"]

ENTITY_COLLECTION_SUFFIX = "_entities"
"""The entity-name collection is the memories collection's name with this suffix."""

_NAMESPACE = uuid.UUID("5b0f7a52-3c1e-4d0c-9a43-6f0e2b8d7c11")
_KEY = "entity_key"


@dataclass(frozen=True)
class NameHit:
    """An entity whose name is near a query: its exact `scope`, name `key` and cosine `score` (-1..1)."""

    scope: Scope
    key: str
    score: float


class EntityNames:
    """The name embeddings of a graph's entities, as points of one collection.

    Args:
        vectors: the entity-name collection's store (any backend; `open_entity_names` opens it).

    Every method may raise `StoreUnavailable` (retryable) or `StoreError` from the store.
    """

    def __init__(self, vectors: VectorStore) -> None:
        self.vectors = vectors

    @staticmethod
    def point_id(scope: Scope, key: str) -> str:
        """The point id of entity `key` of exactly `scope` (UUID5 of the injective scope key and the key)."""
        return str(uuid.uuid5(_NAMESPACE, f"{scope.key()}\n{key}"))

    def upsert(self, scope: Scope, names: Sequence[tuple[str, str, Sequence[float]]], *, when: datetime,
               job_id: str) -> None:
        """Write name embeddings (idempotent: the same entity always has the same point).

        Args:
            scope: the entities' exact scope.
            names: ``(key, display name, embedding)`` per entity; empty writes nothing.
            when: the writing job's time (UTC), the points' ``created_at``.
            job_id: the writing job.
        """
        if not names:
            return
        self.vectors.upsert([
            MemoryPoint(id=self.point_id(scope, key), vector=vector, memory=name, scope=scope, created_at=when,
                        updated_at=None, metadata={_KEY: key}, actor_id=None, role=None, source_message_ids=(),
                        job_id=job_id)
            for key, name, vector in names])

    def embedded(self, scope: Scope, keys: Sequence[str]) -> set[str]:
        """Which of `keys` have a name embedding in exactly `scope` (one read by point id)."""
        if not keys:
            return set()
        found = self.vectors.retrieve([self.point_id(scope, k) for k in keys])
        return {str(m.metadata.get(_KEY)) for m in found if m.metadata.get(_KEY) is not None
                and (m.user_id, m.agent_id, m.run_id) == (scope.user_id, scope.agent_id, scope.run_id)}

    def similar(self, scope: Scope, vector: Sequence[float], *, limit: int, threshold: float) -> list[NameHit]:
        """The `limit` entities nearest to `vector` among those `scope` covers (Mem0's read semantics: every
        id the scope sets must match), with cosine similarity at least `threshold`, best first."""
        hits = self.vectors.search(vector, scope, limit=limit, threshold=threshold)
        return [NameHit(Scope(user_id=h.user_id, agent_id=h.agent_id, run_id=h.run_id), str(h.metadata[_KEY]),
                        float(h.score or 0.0))
                for h in hits if h.metadata.get(_KEY) is not None]

    def delete(self, scope: Scope, keys: Sequence[str]) -> None:
        """Delete the name embeddings of `keys` in exactly `scope` (missing ones are ignored)."""
        if keys:
            self.vectors.delete([self.point_id(scope, k) for k in keys])

    def delete_scope(self, scope: Scope, *, page: int = 500) -> int:
        """Delete every name embedding `scope` covers (Mem0's semantics, as `GraphStore.delete_scope`).

        Returns:
            How many points were deleted.
        """
        deleted = 0
        while True:
            ids = [m.id for m in self.vectors.list(scope, limit=page)]
            if not ids:
                return deleted
            self.vectors.delete(ids)
            deleted += len(ids)


def open_entity_names(settings: Settings, *, role: Literal["owner", "reader"] = "owner",
                      own_if_free: bool = False) -> EntityNames:
    """The process's entity-name collection, beside the memories collection (same server or folder, same
    roles: see `stores.vector_open.open_vector_store`).

    Raises:
        StoreOwned, StoreNeedsMigration, StoreError, StoreUnavailable: as `open_vector_store`.
    """
    from stores.vector_open import open_vector_store

    qdrant = settings.qdrant.model_copy(update={"collection": settings.qdrant.collection + ENTITY_COLLECTION_SUFFIX})
    return EntityNames(open_vector_store(qdrant, settings.embedder.dims, role=role, redis_url=settings.redis.url,
                                         own_if_free=own_if_free))

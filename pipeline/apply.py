"""Write stages: apply a plan to the vector store and to the graph store; they run in parallel.

Each writes one store: the vector write the memories and the entity-name points (vectors too), the graph
write Neo4j's entities and relations. The name points of entities the graph write's forgetting deleted go
in finalize, once both have landed (the vector write may have written one meanwhile)."""

from __future__ import annotations

import logging

from memq.models import AddJob, MemoryEvent
from pipeline.types import Plan, WriteResult
from stores.embedder import Embedder
from stores.graph import EntityWrite, GraphStore, GraphWrite, entity_key
from stores.vectors import MemoryPoint, VectorStore

logger = logging.getLogger(__name__)


def _outside_scope(job: AddJob, plan: Plan, vectors: VectorStore) -> set[str]:
    """Ids the plan would UPDATE or DELETE that belong to another scope than the job's exactly."""
    touched = [a.memory_id for a in plan.actions if a.event in (MemoryEvent.UPDATE, MemoryEvent.DELETE)]
    mine = (job.scope.user_id, job.scope.agent_id, job.scope.run_id)
    return {m.id for m in vectors.retrieve(touched) if (m.user_id, m.agent_id, m.run_id) != mine}


def write_vectors(job: AddJob, plan: Plan, vectors: VectorStore, graph: GraphStore | None = None,
                  embedder: Embedder | None = None) -> WriteResult:
    """Apply ADD/UPDATE (upsert) and DELETE (delete) actions to Qdrant; NONE writes nothing. With graph
    memory on, the plan's entity-name embeddings go to the entity-name collection too (`GraphStore.write_names`).

    Idempotent: point ids and payloads are fixed by the plan, so running it again writes the same.
    Only memories of the job's exact scope are touched: an UPDATE or DELETE of a memory whose scope
    differs (which the decider is never shown) is dropped, with a warning.

    Args:
        job: the job (scope, time).
        plan: the decided actions.
        vectors: the vector store.
        graph: the graph store, or None when graph memory is off (then no names are written).
        embedder: embeds entity names the plan has no embedding for and the collection has none either
            (rare); needed when `graph` is given.

    Returns:
        Counts of upserted and deleted points, and of name points written.

    Raises:
        StoreUnavailable: Qdrant is unreachable (retryable).
        StoreError: a permanent store failure.
        LLMUnavailable: a hosted embedder is unavailable for a name the plan took for embedded that is not
            (rare; retryable).
    """
    when = job.timestamp or job.enqueued_at
    foreign = _outside_scope(job, plan, vectors)
    if foreign:
        logger.warning("job %s: dropped %d actions on memories of another scope", job.job_id, len(foreign))
    points = [
        MemoryPoint(id=a.memory_id, vector=a.vector, memory=a.memory, scope=job.scope, created_at=a.created_at,
                    updated_at=when if a.event is MemoryEvent.UPDATE else None, metadata=a.metadata,
                    actor_id=a.actor_id, role=a.role, source_message_ids=a.source_message_ids, job_id=job.job_id,
                    occurred_at=a.occurred_at)
        for a in plan.actions if a.event in (MemoryEvent.ADD, MemoryEvent.UPDATE) and a.memory_id not in foreign
    ]
    deleted = [a.memory_id for a in plan.actions if a.event is MemoryEvent.DELETE and a.memory_id not in foreign]
    vectors.upsert(points)
    vectors.delete(deleted)
    names = 0
    if graph is not None and plan.graph is not None:
        names = graph.write_names(_graph_write(job, plan), embed=embedder.embed if embedder is not None else None)
    return WriteResult(store="qdrant", upserted=len(points), deleted=len(deleted), names=names)


def _graph_write(job: AddJob, plan: Plan) -> GraphWrite:
    """The plan's graph change as the graph store takes it (``plan.graph`` must be set)."""
    g = plan.graph
    assert g is not None
    deleted = list(dict.fromkeys([*(a.memory_id for a in plan.actions if a.event is MemoryEvent.DELETE),
                                  *g.forgotten]))
    return GraphWrite(
        job_id=job.job_id, scope=job.scope, when=job.timestamp or job.enqueued_at,
        entities=[EntityWrite(key=entity_key(e.name), name=e.name, entity_type=e.entity_type,
                              embedding=g.embeddings.get(entity_key(e.name))) for e in g.entities],
        relations=g.relations, invalidated=g.invalidated_relations, deleted_memory_ids=deleted)


def write_graph(job: AddJob, plan: Plan, graph: GraphStore | None) -> WriteResult:
    """Apply the plan's graph change to Neo4j (`GraphStore.merge_change`): merge entities and relations,
    invalidate contradicted relations, and forget memories the job deleted. Neo4j only: the entity-name
    points are the vector write's, and those of entities forgetting deleted go in finalize.

    Idempotent: everything is MERGE-keyed, relation ids and timestamps come from the plan.

    Args:
        job: the job (scope, time).
        plan: the decided actions and graph change.
        graph: the graph store, or None when graph memory is off (then nothing is written).

    Returns:
        Counts (``upserted`` = entities + relations merged, ``deleted`` = relations invalidated), the keys
        of the entities forgetting deleted, or ``skipped=True`` when graph memory is off.

    Raises:
        StoreUnavailable: Neo4j is unreachable (retryable).
        StoreError: a permanent store failure.
    """
    if graph is None or plan.graph is None:
        return WriteResult(store="neo4j", skipped=True)
    g = plan.graph
    gone = graph.merge_change(_graph_write(job, plan))
    return WriteResult(store="neo4j", upserted=len(g.entities) + len(g.relations), deleted=len(g.invalidated),
                       forgotten_entities=gone)

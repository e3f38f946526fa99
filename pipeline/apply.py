"""Write stages: apply a plan to the vector store (the graph write fills its own slot)."""

from __future__ import annotations

from memq.models import AddJob, MemoryEvent
from pipeline.types import Plan, WriteResult
from stores.qdrant import MemoryPoint, VectorStore


def write_vectors(job: AddJob, plan: Plan, vectors: VectorStore) -> WriteResult:
    """Apply ADD/UPDATE (upsert) and DELETE (delete) actions to Qdrant; NONE writes nothing.

    Idempotent: point ids and payloads are fixed by the plan, so running it again writes the same.

    Args:
        job: the job (scope, time).
        plan: the decided actions.
        vectors: the vector store.

    Returns:
        Counts of upserted and deleted points.

    Raises:
        StoreUnavailable: Qdrant is unreachable (retryable).
        StoreError: a permanent store failure.
    """
    when = job.timestamp or job.enqueued_at
    points = [
        MemoryPoint(id=a.memory_id, vector=a.vector, memory=a.memory, scope=job.scope, created_at=a.created_at,
                    updated_at=when if a.event is MemoryEvent.UPDATE else None, metadata=a.metadata,
                    actor_id=a.actor_id, role=a.role, source_message_ids=a.source_ids, job_id=job.job_id)
        for a in plan.actions if a.event in (MemoryEvent.ADD, MemoryEvent.UPDATE)
    ]
    deleted = [a.memory_id for a in plan.actions if a.event is MemoryEvent.DELETE]
    vectors.upsert(points)
    vectors.delete(deleted)
    return WriteResult(store="qdrant", upserted=len(points), deleted=len(deleted))


def write_graph(job: AddJob, plan: Plan) -> WriteResult:
    """The graph write's slot in the parallel group; graph memory is not enabled yet, so it skips.

    Returns:
        ``WriteResult(store="neo4j", skipped=True)``.
    """
    return WriteResult(store="neo4j", skipped=True)

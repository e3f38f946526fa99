"""Finalize stage: history rows for every event and the job's result in Mem0's shape."""

from __future__ import annotations

import uuid

from memq.models import AddJob, MemoryEvent, MemoryResult
from pipeline.types import Plan
from stores.history import HistoryRecord, HistoryStore

HISTORY_ID_NAMESPACE = uuid.UUID("8a4e2f71-36c9-4b0d-9e58-c27d1f6a4b93")


def history_rows(job: AddJob, plan: Plan) -> list[HistoryRecord]:
    """One row per ADD/UPDATE/DELETE, with a deterministic id (job id + position); NONE writes none."""
    when = job.timestamp or job.enqueued_at
    rows: list[HistoryRecord] = []
    for position, a in enumerate(plan.actions):
        if a.event is MemoryEvent.NONE:
            continue
        rows.append(HistoryRecord(
            id=str(uuid.uuid5(HISTORY_ID_NAMESPACE, f"{job.job_id}:{position}")),
            memory_id=a.memory_id,
            old_memory=a.previous_memory if a.event is not MemoryEvent.ADD else None,
            new_memory=a.memory if a.event is not MemoryEvent.DELETE else None,
            event=a.event.value,
            created_at=when,
            updated_at=when if a.event is not MemoryEvent.ADD else None,
            is_deleted=a.event is MemoryEvent.DELETE,
            actor_id=a.actor_id,
            role=a.role,
            job_id=job.job_id,
            position=position,
            **job.scope.as_filter(),
        ))
    return rows


def results(plan: Plan) -> list[MemoryResult]:
    """The job's events as Mem0 returns them: ADD, UPDATE (with ``previous_memory``) and DELETE."""
    return [MemoryResult(id=a.memory_id, memory=a.memory, event=a.event,
                         previous_memory=a.previous_memory if a.event is MemoryEvent.UPDATE else None)
            for a in plan.actions if a.event is not MemoryEvent.NONE]


def event_counts(plan: Plan) -> dict[str, int]:
    """Actions per event, NONE included (``{"ADD": 3, "UPDATE": 1, "DELETE": 0, "NONE": 2}``)."""
    counts = {e.value: 0 for e in MemoryEvent}
    for a in plan.actions:
        counts[a.event.value] += 1
    return counts


def finalize(job: AddJob, plan: Plan, history: HistoryStore) -> list[MemoryResult]:
    """Write the job's history rows (idempotent) and return its results.

    Raises:
        StoreUnavailable: the history database is unreachable (retryable).
    """
    history.add(history_rows(job, plan))
    return results(plan)

"""Synchronous management: deletes across every store, and dead-letter replay.

Deleting a memory removes its point, writes a DELETE history row, and takes it off the relations it
supported; relations left without support and entities left without relations go too, so no orphan
stays in the graph. `delete_all` removes a scope's points and entities (and so its relations).
Like search, in embedded mode these run in the process that owns the Qdrant folder.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery

from memq.config import Queues
from memq.errors import JobNotFound
from memq.jobstore import Envelope, JobStore
from memq.messages import StartMessages
from memq.models import AddJob, JobState, MemoryEvent, utcnow
from memq.scope import make_scope
from pipeline.clients import Clients
from stores.history import HistoryRecord
from stores.records import RecordStore


class MemoryAdmin:
    """Deletes across Qdrant, Neo4j and the history store.

    Args:
        clients: the process's clients.
    """

    def __init__(self, clients: Clients) -> None:
        self._c = clients

    def delete(self, memory_id: str) -> bool:
        """Delete one memory everywhere.

        Returns:
            True if it existed.

        Raises:
            StoreUnavailable: a store is unreachable (nothing is half-deleted in Qdrant: the point goes last).
        """
        found = self._c.vectors.retrieve([memory_id])
        if not found:
            return False
        item = found[0]
        scope = make_scope(user_id=item.user_id, agent_id=item.agent_id, run_id=item.run_id)
        if self._c.graph is not None:
            self._c.graph.forget_memories(scope, [memory_id])
        now = utcnow()
        self._c.history.add([HistoryRecord(
            id=str(uuid.uuid4()), memory_id=memory_id, old_memory=item.memory, new_memory=None,
            event=MemoryEvent.DELETE.value, created_at=now, updated_at=now, is_deleted=True, actor_id=item.actor_id,
            role=item.role, job_id="api:delete", user_id=scope.user_id, agent_id=scope.agent_id,
            run_id=scope.run_id)])
        self._c.vectors.delete([memory_id])
        return True

    def delete_all(self, *, user_id: str | None = None, agent_id: str | None = None,
                   run_id: str | None = None) -> dict[str, Any]:
        """Delete every memory, entity and relation of a scope (matching the given ids).

        Returns:
            ``{"memories": n, "entities": m}`` deleted.

        Raises:
            MissingScope, InvalidScope: no or a bad scope id (never deletes everything).
            StoreUnavailable: a store is unreachable.
        """
        scope = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                           max_chars=self._c.settings.limits.max_scope_id_chars)
        entities = self._c.graph.delete_scope(scope) if self._c.graph is not None else 0
        deleted = 0
        while batch := self._c.vectors.list(scope, limit=256):
            self._c.vectors.delete([m.id for m in batch])
            deleted += len(batch)
        return {"memories": deleted, "entities": entities}


def replay_dead_letters(records: RecordStore, jobs: JobStore, job_ids: Sequence[str] | None = None) -> list[str]:
    """Enqueue dead-lettered jobs again (all when `job_ids` is None), each at the end of its scope's order.

    The job keeps its id and every stage output it already stored (a replay after a failed decide does
    not extract again); its record goes back to ``queued``. The letter is removed once enqueued.

    Returns:
        The job ids enqueued again.

    Raises:
        JobNotFound: a requested id has no dead letter.
        StoreUnavailable: Redis or the SQL database is unreachable.
    """
    letters = {letter.job_id: letter for letter in records.dead_letters()}
    wanted = list(letters) if job_ids is None else list(job_ids)
    missing = [j for j in wanted if j not in letters]
    if missing:
        raise JobNotFound(missing[0])
    messages = StartMessages(Celery("memq-replay", set_as_current=False))
    replayed: list[str] = []
    for job_id in wanted:
        job = AddJob.model_validate_json(letters[job_id].request)
        jobs.enqueue([Envelope(job, Queues.LIGHT, messages.build(job_id, Queues.LIGHT))], replay=True)
        records.remove_dead_letter(job_id)
        records.save(job, JobState.QUEUED)
        replayed.append(job_id)
    return replayed

"""Decide stage of an edit job: the plan of an ``update``, ``delete`` or ``delete_all`` a caller asked for.

No model is asked: the caller named the memories. What makes an edit safe is *when* this runs: in its
scope's turn, like an add's decide, so it never races an add of the same scope (an add cannot update
a memory a delete has just removed, and a delete cannot miss a memory an earlier add wrote). The
memories are read here, at that moment, and only those whose scope equals the job's exactly are
touched (the client enqueues each edit in its memory's own scope).

The plan is an ordinary `Plan` of UPDATE / DELETE actions, so the write stages, history rows (a
DELETE row for every deleted memory), results and redelivery rules are the add pipeline's. The graph
part forgets the memories deleted or rewritten: a relation that only they supported goes, and so do
entities left without relations. (``delete_all`` forgets its memories rather than wiping the scope's
graph by key: a graph write retried after the scope has moved on then never touches what a later add
wrote.) An update does not extract new relations from the new text (no model call); Mem0 re-links
entities there.
"""

from __future__ import annotations

from memq.models import AddJob, MemoryEvent, MemoryItem, Operation
from pipeline.types import Action, GraphPlan, Plan
from stores.embedder import Embedder
from stores.vectors import VectorStore

def plan_edit(job: AddJob, vectors: VectorStore, embedder: Embedder) -> Plan:
    """The actions of an edit job, from the memories as they are now.

    Args:
        job: an ``update``, ``delete`` or ``delete_all`` job (`AddJob.is_edit`).
        vectors: the vector store (read only here).
        embedder: embeds the new texts of an update (one batch call).

    Returns:
        A `Plan`: one UPDATE per updated memory (new text and vector; metadata merged key by key over
        the old, as Mem0 merges; ``created_at``, speaker and provenance kept), one DELETE per deleted
        memory (its last text in ``memory`` and ``previous_memory``), in the order of the edits (ids are
        distinct: the producer refuses a batch naming one twice), or
        oldest first for ``delete_all``. An edit whose memory is gone, or is not of exactly the job's
        scope, plans nothing and its id is listed in `Plan.missing`. `Plan.graph` says what the graph
        forgets.

    Raises:
        ValueError: `job` is an add.
        StoreUnavailable: Qdrant is unreachable (the stage is retried).
    """
    if not job.is_edit:
        raise ValueError("plan_edit plans edit jobs only")
    if job.operation is Operation.DELETE_ALL:
        doomed = vectors.list(job.scope, limit=max(1, vectors.count(job.scope)), exact=True)
        return Plan(actions=[_delete(m, job) for m in doomed], graph=GraphPlan(forgotten=[m.id for m in doomed]))
    found = {m.id: m for m in vectors.retrieve(list(dict.fromkeys(e.memory_id for e in job.edits)))
             if _mine(job, m)}
    missing = [e.memory_id for e in job.edits if e.memory_id not in found]
    if job.operation is Operation.DELETE:
        doomed = [found.pop(e.memory_id) for e in job.edits if e.memory_id in found]
        return Plan(actions=[_delete(m, job) for m in doomed], missing=missing,
                    graph=GraphPlan(forgotten=[m.id for m in doomed]))
    updates = [(found[e.memory_id], e) for e in job.edits if e.memory_id in found]  # ids are distinct
    texts = [e.text if e.text is not None else old.memory for old, e in updates]
    vectors_of = embedder.embed(texts) if updates else []
    actions = [Action(event=MemoryEvent.UPDATE, memory_id=old.id, memory=text, previous_memory=old.memory,
                      vector=vector, created_at=old.created_at or job.enqueued_at,
                      metadata={**old.metadata, **(e.metadata or {})}, source_message_ids=old.source_message_ids,
                      actor_id=old.actor_id, role=old.role, occurred_at=old.occurred_at)
               for (old, e), text, vector in zip(updates, texts, vectors_of)]
    rewritten = [old.id for (old, _), text in zip(updates, texts) if text != old.memory]
    return Plan(actions=actions, missing=missing, graph=GraphPlan(forgotten=rewritten))


def _mine(job: AddJob, m: MemoryItem) -> bool:
    s = job.scope
    return (m.user_id, m.agent_id, m.run_id) == (s.user_id, s.agent_id, s.run_id)


def _delete(m: MemoryItem, job: AddJob) -> Action:
    return Action(event=MemoryEvent.DELETE, memory_id=m.id, memory=m.memory, previous_memory=m.memory,
                  created_at=m.created_at or job.enqueued_at, metadata=m.metadata,
                  source_message_ids=m.source_message_ids, actor_id=m.actor_id, role=m.role,
                  occurred_at=m.occurred_at)

"""`Memory`: memq's one public client for web apps, with Mem0's method names, arguments and result shapes.

A Mem0 script moves over by changing its import and its constructor::

    from memq import Memory                 # was: from mem0 import Memory
    m = Memory(user_id="alice", wait=True)  # was: m = Memory()  (or Memory.from_config(...))

**Writes are jobs.** ``add``, ``update``, ``delete``, ``delete_all``, ``batch_update``, ``batch_delete``
and ``reset`` enqueue jobs on Redis and return their `Receipt` at once; with ``wait=True`` (per call,
or for every call from the constructor) they wait for the jobs and return what Mem0 returns. Every
job runs in its scope's order, so an update or delete never races an add of the same scope. An edit
goes to the scope the memory itself has (``user_id=alice`` may reach alice-with-agent-bot's memory),
and ``delete_all`` / ``reset`` to every exact scope the caller's covers, including scopes that only
have jobs waiting so far.

**Every call is scoped.** Scope ids come from the call, else from the client (``Memory(user_id=...)``
binds a client to a tenant: a call may add ids to narrow it, never replace one: `ScopeMismatch`).
Id-based calls (get, update, delete, history, batches) treat a memory outside the caller's scope
exactly as an unknown id (`MemoryNotFound`, None or []).

**Shapes.** Results are Mem0 1.0.11's key for key (`mem0_item`, `mem0_history_row`): items carry
``id, memory, hash, metadata, score, created_at, updated_at`` and the scope, ``actor_id`` and ``role``
keys that are set; ``relations`` is present when graph memory is on, as in Mem0. memq's own fuller
shapes (provenance, job ids) are in `memories.api.Memories` (unbound: it takes each call's scope) and
`Memory.status`. The client's binding holds for its own methods; keep it private to the request that
made it.

Differences from Mem0, on purpose: ``reset`` deletes the caller's scope only (a web app's client never
wipes other tenants) and keeps the audit trail (a DELETE history row per memory) where Mem0 drops the
history table; an update does not re-extract graph relations from the new text.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from memq.config import Settings, load_settings
from memq.errors import InvalidOption, JobFailed, MemoryNotFound, MissingScope, ScopeMismatch, WaitTimeout
from memq.models import AddJob, JobState, JobStatus, Operation, Receipt, Scope
from memq.scope import make_scope
from memories.api import Memories
from producer.client import Producer
from producer.edits import build_edit_job, check_edits, check_memory_id

__all__ = ["AsyncMemory", "Memory", "mem0_history", "mem0_item"]

_SCOPE_KEYS = ("user_id", "agent_id", "run_id")
_PROMOTED = ("user_id", "agent_id", "run_id", "actor_id", "role")
_HISTORY = ("id", "memory_id", "old_memory", "new_memory", "event", "created_at", "updated_at", "is_deleted",
            "actor_id", "role")


def mem0_item(item: Mapping[str, Any], *, score: bool = True) -> dict[str, Any]:
    """A memq item (`memq.models.MemoryItem` as a dict) in Mem0's item shape.

    Args:
        score: keep the ``score`` key (Mem0's search and get have it, None in get; get_all has none).

    Returns:
        ``{id, memory, hash, metadata (None when empty), score, created_at, updated_at}`` plus each of
        ``user_id, agent_id, run_id, actor_id, role`` that is set, plus ``rerank_score`` when the search
        was reranked, plus memq's ``occurred_at`` when the memory has one (temporal grounding).
    """
    out: dict[str, Any] = {k: item.get(k) for k in ("id", "memory", "hash")}
    out["metadata"] = dict(item["metadata"]) if item.get("metadata") else None
    out.update({k: item.get(k) for k in (("score",) if score else ()) + ("created_at", "updated_at")})
    out.update({k: item[k] for k in _PROMOTED if item.get(k) is not None})
    if "rerank_score" in item:
        out["rerank_score"] = item["rerank_score"]
    if item.get("occurred_at") is not None:
        out["occurred_at"] = item["occurred_at"]
    return out


def mem0_history(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A memory's memq history rows in Mem0's columns: ``{id, memory_id, old_memory, new_memory, event,
    created_at, updated_at, is_deleted, actor_id, role}``. As in Mem0, ``created_at`` is the memory's
    creation time on every row (memq's rows carry the event's time there) and ``updated_at`` the time
    of the UPDATE or DELETE."""
    born = next((r.get("created_at") for r in rows if r.get("event") == "ADD"), None)
    return [{**{k: row.get(k) for k in _HISTORY},
             **({"created_at": born} if born is not None and row.get("event") != "ADD" else {})} for row in rows]


class Memory:
    """Mem0's ``Memory`` over memq's queue: writes are jobs, reads are synchronous.

    Args:
        settings: memq settings (the environment's, ``MEMQ_*``, when omitted).
        user_id, agent_id, run_id: bind the client to a scope (a tenant): each call's scope is this one,
            narrowed by the ids the call adds; a call that names a different id raises `ScopeMismatch`.
        wait: default of every write's ``wait``: False returns receipts at once, True waits for the
            jobs and returns Mem0's result (what a ported Mem0 script expects).
        timeout: default seconds a waiting write waits (`WaitTimeout` after it; the jobs go on).
        open_embedded: in embedded mode with no worker running, let reads open the vector folder
            (short-lived tools; see `memories.api.Memories`).

    Raises:
        InvalidScope: a bound scope id that is not a valid id.
        InvalidOption: `wait` not a bool, `timeout` not a positive number.
    """

    def __init__(self, settings: Settings | None = None, *, user_id: str | None = None, agent_id: str | None = None,
                 run_id: str | None = None, wait: bool = False, timeout: float = 60.0,
                 open_embedded: bool = False) -> None:
        self.settings = settings or load_settings()
        self.bound: dict[str, str] = {}
        if user_id is not None or agent_id is not None or run_id is not None:
            self.bound = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                                    max_chars=self.settings.limits.max_scope_id_chars).as_filter()
        if not isinstance(wait, bool):
            raise InvalidOption(f"wait must be True or False, got {type(wait).__name__}", field="wait")
        self.wait = wait
        self.timeout = _seconds(timeout)
        self._producer = Producer(self.settings)
        self._reads = Memories(self.settings, open_embedded=open_embedded)

    # --- scope ----------------------------------------------------------------------------------

    def _ids(self, user_id: object, agent_id: object, run_id: object) -> dict[str, object]:
        given = {"user_id": user_id, "agent_id": agent_id, "run_id": run_id}
        ids: dict[str, object] = dict(self.bound)
        for key, value in given.items():
            if value is None:
                continue
            if key in self.bound and value != self.bound[key]:
                raise ScopeMismatch(f"{key} differs from the one this client is bound to", field=key)
            ids[key] = value
        return ids

    def _scope(self, user_id: object, agent_id: object, run_id: object) -> Scope:
        ids = self._ids(user_id, agent_id, run_id)
        return make_scope(**ids, max_chars=self.settings.limits.max_scope_id_chars)

    # --- writes ---------------------------------------------------------------------------------

    def add(self, messages: object, *, user_id: str | None = None, agent_id: str | None = None,
            run_id: str | None = None, metadata: Mapping[str, Any] | None = None, infer: bool = True,
            memory_type: str | None = None, prompt: str | None = None, timestamp: object = None,
            idempotency_key: str | None = None, wait: bool | None = None,
            timeout: float | None = None) -> Receipt | dict[str, Any]:
        """Remember messages (Mem0's ``add``): validated and enqueued at once.

        Args: as `producer.Producer.add`, plus
            wait: wait for the job (default: the client's `wait`).
            timeout: seconds to wait (default: the client's).

        Returns:
            Without wait, the job's `Receipt`. With wait, Mem0's add result: ``{"results": [{id, memory,
            event} (+ previous_memory for UPDATE; + actor_id, role with infer=False)]}`` and, with graph
            memory on, ``"relations": {"added_entities": [[{source, relationship, target}]],
            "deleted_entities": [[...]]}``.

        Raises:
            InvalidRequest (and subclasses): a bad request; nothing was enqueued.
            BrokerUnavailable: Redis is unreachable.
            JobFailed: (wait) the job failed (its dead letter is kept; `status` tells why).
            WaitTimeout: (wait) the job had not ended after `timeout` seconds.
        """
        ids = self._ids(user_id, agent_id, run_id)
        receipt = self._producer.add(messages, **ids, metadata=metadata, infer=infer,  # type: ignore[arg-type]
                                    memory_type=memory_type, prompt=prompt, timestamp=timestamp,
                                    idempotency_key=idempotency_key)
        if not self._waits(wait):
            return receipt
        status = self._wait([receipt], timeout)[0]
        results = [self._event(r.model_dump(mode="json")) for r in status.results]
        if not infer and results:
            found = {m.id: m for m in self._reads.vectors.retrieve([r["id"] for r in results])}
            for r in results:
                item = found.get(r["id"])
                r.update(actor_id=item.actor_id if item else None, role=item.role if item else None)
        out: dict[str, Any] = {"results": results}
        if self._reads.graph is not None:
            out["relations"] = _graph_events(status.relations)
        return out

    def update(self, memory_id: str, data: str | None = None, metadata: Mapping[str, Any] | None = None, *,
               text: str | None = None, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None, wait: bool | None = None, timeout: float | None = None
               ) -> Receipt | dict[str, str]:
        """Change a memory's text and/or metadata (Mem0's ``update``; ``text`` is the newer name of
        ``data``). New metadata keys are set over the old ones; the others are kept. ``created_at``
        stays, ``updated_at`` is the job's time, and a history row records the UPDATE.

        Returns:
            Without wait, the job's `Receipt`; with wait, ``{"message": "Memory updated successfully!"}``.

        Raises:
            MissingScope, InvalidScope, ScopeMismatch: no, a bad, or a foreign scope id.
            InvalidEdit: neither text nor metadata, a bad id or text; InvalidMetadata: bad metadata.
            MemoryNotFound: no such memory in the caller's scope (also when it was deleted before the
                update's turn came; then nothing changed).
            JobFailed, WaitTimeout: (wait) as for `add`.
        """
        item: dict[str, Any] = {"memory_id": memory_id}
        if (text if text is not None else data) is not None:
            item["text"] = text if text is not None else data
        if metadata is not None:
            item["metadata"] = metadata
        receipts = self._edit(Operation.UPDATE, [item], self._scope(user_id, agent_id, run_id), wait, timeout)
        return receipts[0] if isinstance(receipts, list) else {"message": "Memory updated successfully!"}

    def delete(self, memory_id: str, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None, wait: bool | None = None, timeout: float | None = None
               ) -> Receipt | dict[str, str]:
        """Delete one memory (Mem0's ``delete``): its point, its support of graph relations (relations
        left unsupported and entities left alone go too) and a DELETE history row.

        Returns:
            Without wait, the job's `Receipt`; with wait, ``{"message": "Memory deleted successfully!"}``.

        Raises:
            MissingScope, InvalidScope, ScopeMismatch: no, a bad, or a foreign scope id.
            MemoryNotFound: no such memory in the caller's scope when the call was made.
            JobFailed, WaitTimeout: (wait) as for `add`.
        """
        receipts = self._edit(Operation.DELETE, [{"memory_id": memory_id}], self._scope(user_id, agent_id, run_id),
                              wait, timeout)
        return receipts[0] if isinstance(receipts, list) else {"message": "Memory deleted successfully!"}

    def batch_update(self, memories: Sequence[Mapping[str, Any]], *, user_id: str | None = None,
                     agent_id: str | None = None, run_id: str | None = None, wait: bool | None = None,
                     timeout: float | None = None) -> list[Receipt] | dict[str, str]:
        """Update up to 1,000 memories (Mem0's hosted ``batch_update``): items ``{"memory_id", "text",
        "metadata"}``. Every id is checked first: if one is not in the caller's scope nothing is enqueued.

        Returns:
            Without wait, one `Receipt` per scope the memories belong to; with wait,
            ``{"message": "Successfully updated <n> memories"}``.

        Raises:
            InvalidEdit: not a list of 1..1000 items, a repeated id, an item that changes nothing.
            MemoryNotFound: an id not in the caller's scope (nothing was enqueued), or (wait) a memory
                deleted before the batch's turn came (the others were updated).
            MissingScope, InvalidScope, ScopeMismatch, JobFailed, WaitTimeout: as for `update`.
        """
        out = self._edit(Operation.UPDATE, memories, self._scope(user_id, agent_id, run_id), wait, timeout)
        return out if isinstance(out, list) else {"message": f"Successfully updated {out} memories"}

    def batch_delete(self, memories: Sequence[Mapping[str, Any]], *, user_id: str | None = None,
                     agent_id: str | None = None, run_id: str | None = None, wait: bool | None = None,
                     timeout: float | None = None) -> list[Receipt] | dict[str, str]:
        """Delete up to 1,000 memories (Mem0's hosted ``batch_delete``): items ``{"memory_id"}``. Every id
        is checked first: if one is not in the caller's scope nothing is enqueued.

        Returns:
            Without wait, one `Receipt` per scope; with wait, ``{"message": "Successfully deleted <n>
            memories"}`` (n: the memories deleted by these jobs).

        Raises:
            InvalidEdit, MemoryNotFound, MissingScope, InvalidScope, ScopeMismatch, JobFailed, WaitTimeout:
                as for `batch_update`.
        """
        out = self._edit(Operation.DELETE, memories, self._scope(user_id, agent_id, run_id), wait, timeout)
        return out if isinstance(out, list) else {"message": f"Successfully deleted {out} memories"}

    def delete_all(self, *, user_id: str | None = None, agent_id: str | None = None, run_id: str | None = None,
                   wait: bool | None = None, timeout: float | None = None) -> list[Receipt] | dict[str, str]:
        """Delete every memory, entity and relation the caller's scope covers (Mem0's ``delete_all``),
        with a DELETE history row per memory. One job per exact scope covered, each after the jobs
        already accepted in that scope (an add accepted before this call is deleted too).

        Returns:
            Without wait, the jobs' receipts ([] when the scope holds nothing); with wait,
            ``{"message": "Memories deleted successfully!"}``.

        Raises:
            MissingScope: no scope id (never deletes everything).
            InvalidScope, ScopeMismatch, JobFailed, WaitTimeout, StoreUnavailable, BrokerUnavailable.
        """
        scope = self._scope(user_id, agent_id, run_id)
        jobs = [build_edit_job(Operation.DELETE_ALL, s) for s in self._scopes_under(scope)]
        receipts = self._producer.edit(jobs)
        if not self._waits(wait):
            return receipts
        self._wait(receipts, timeout)
        return {"message": "Memories deleted successfully!"}

    def reset(self, *, user_id: str | None = None, agent_id: str | None = None, run_id: str | None = None,
              wait: bool | None = None, timeout: float | None = None) -> list[Receipt] | None:
        """Forget everything of the client's scope (Mem0's ``reset``, for one tenant): `delete_all` over
        the bound scope (narrowed by any ids given). History rows are kept (a DELETE row per memory).

        Returns:
            Without wait, the jobs' receipts; with wait, None (as Mem0's ``reset``).

        Raises:
            MissingScope: the client is not bound to a scope and no id was given: memq has no call that
                wipes every tenant.
        """
        if not self.bound and user_id is None and agent_id is None and run_id is None:
            raise MissingScope("reset forgets one scope: bind the client (Memory(user_id=...)) or pass an id")
        done = self.delete_all(user_id=user_id, agent_id=agent_id, run_id=run_id, wait=wait, timeout=timeout)
        return done if isinstance(done, list) else None

    # --- reads ----------------------------------------------------------------------------------

    def search(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None, limit: int = 100, filters: Mapping[str, Any] | None = None,
               threshold: float | None = None, rerank: bool = True, top_k: int | None = None,
               after: object = None, before: object = None) -> dict[str, Any]:
        """Memories by meaning (Mem0's ``search``); arguments and errors as `memories.api.Memories.search`.

        Args:
            rerank: rerank the hits when a rerank model is configured (``MEMQ_RERANK__MODEL``), as Mem0.
            after, before: memq's time range on ``occurred_at`` (after inclusive, before exclusive;
                memories without a date are left out when one is given); raises `InvalidTimeRange`.

        Returns:
            ``{"results": [mem0 item with score], "relations": [{source, relationship, destination}]}``
            (relations only with graph memory on).
        """
        found = self._reads.search(query, **self._scope(user_id, agent_id, run_id).as_filter(), limit=limit,
                                     filters=filters, threshold=threshold, top_k=top_k, rerank=rerank,
                                     after=after, before=before)
        return self._shaped(found, found["relations"])

    def get(self, memory_id: str, *, user_id: str | None = None, agent_id: str | None = None,
            run_id: str | None = None) -> dict[str, Any] | None:
        """One memory in Mem0's item shape, or None when the caller's scope has no such memory."""
        item = self._reads.get(memory_id, **self._scope(user_id, agent_id, run_id).as_filter())
        return mem0_item(item) if item is not None else None

    def get_all(self, *, user_id: str | None = None, agent_id: str | None = None, run_id: str | None = None,
                filters: Mapping[str, Any] | None = None, limit: int = 100, offset: int = 0,
                top_k: int | None = None) -> dict[str, Any]:
        """A page of the scope's memories, oldest first (Mem0's ``get_all``, plus ``offset`` paging);
        arguments and errors as `memories.api.Memories.get_all`.

        Returns:
            ``{"results": [mem0 item], "relations": [{source, relationship, target}]}`` (relations, the
            scope's valid ones up to `limit`, only with graph memory on, as Mem0).
        """
        scope = self._scope(user_id, agent_id, run_id)
        found = self._reads.get_all(**scope.as_filter(), filters=filters, limit=limit, offset=offset, top_k=top_k)
        graph = self._reads.graph
        relations = graph.relations(scope, limit=limit if top_k is None else top_k, offset=offset) \
            if graph is not None else []
        return self._shaped(found, relations, score=False)

    def history(self, memory_id: str, *, user_id: str | None = None, agent_id: str | None = None,
                run_id: str | None = None) -> list[dict[str, Any]]:
        """A memory's events, oldest first, in Mem0's history columns ([] outside the caller's scope)."""
        rows = self._reads.history(memory_id, **self._scope(user_id, agent_id, run_id).as_filter())
        return mem0_history(rows)

    def status(self, job: str | Receipt, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None) -> JobStatus:
        """A job's status (memq's own shape), read in the caller's scope (or the receipt's).

        Raises:
            JobNotFound: no such job in the scope.
            ScopeMismatch: a receipt of a scope outside the one the client is bound to.
        """
        if isinstance(job, Receipt):  # the receipt's scope must still lie inside the client's own
            scope = self._scope(job.scope.user_id, job.scope.agent_id, job.scope.run_id)
            return self._producer.status(job.job_id, **scope.as_filter())
        return self._producer.status(job, **self._scope(user_id, agent_id, run_id).as_filter())

    def close(self) -> None:
        """Release the Redis connections (stores are process-wide and stay open)."""
        self._producer.close()

    # --- helpers --------------------------------------------------------------------------------

    def _waits(self, wait: object) -> bool:
        if wait is None:
            return self.wait
        if not isinstance(wait, bool):
            raise InvalidOption(f"wait must be True, False or None, got {type(wait).__name__}", field="wait")
        return wait

    def _wait(self, receipts: Sequence[Receipt], timeout: object) -> list[JobStatus]:
        """Follow the jobs to their end; raise for a failed one or at the timeout."""
        seconds = _seconds(self.timeout if timeout is None else timeout)
        statuses = self._producer.wait(receipts, timeout_s=seconds, poll_s=0.05)
        late = [s.job_id for s in statuses if not s.done]
        if late:
            raise WaitTimeout(f"{len(late)} of {len(statuses)} jobs had not ended; they go on", job_ids=late)
        for s in statuses:
            if s.status is JobState.FAILED:
                raise JobFailed.of(s.job_id, s.stage or "?", s.error_type or "?")
        return statuses

    def _edit(self, operation: Operation, items: Sequence[Any], scope: Scope, wait: bool | None,
              timeout: float | None) -> list[Receipt] | int:
        """Validate edits, find each memory's own scope, enqueue one job per scope; wait if asked.

        Returns:
            The receipts, or (wait) how many memories the jobs changed.
        """
        edits = check_edits(operation, items, self.settings.limits)
        owners = self._reads.owners([check_memory_id(e.memory_id) for e in edits], scope)
        for e in edits:
            if e.memory_id not in owners:
                raise MemoryNotFound(e.memory_id)
        groups: dict[Scope, list[Any]] = {}
        for e in edits:
            groups.setdefault(owners[e.memory_id], []).append(e)
        jobs: list[AddJob] = [build_edit_job(operation, s, group) for s, group in groups.items()]
        receipts = self._producer.edit(jobs)
        if not self._waits(wait):
            return receipts
        statuses = self._wait(receipts, timeout)
        changed = {r.id for s in statuses for r in s.results}
        if operation is Operation.UPDATE:
            for e in edits:
                if e.memory_id not in changed:
                    raise MemoryNotFound(e.memory_id)
        return len(changed)

    def _scopes_under(self, scope: Scope) -> list[Scope]:
        """Every exact scope `scope` covers that has memories or unfinished jobs.

        Unfinished jobs are read first: a job leaves that set only once its writes have landed, so a job
        that ends between the two reads is seen in the vector store instead; none falls between."""
        found = dict.fromkeys(self._producer.live_scopes(scope))
        found.update(dict.fromkeys(self._reads.vectors.scopes(scope)))
        return list(found)

    def _event(self, result: dict[str, Any]) -> dict[str, Any]:
        event = {"id": result["id"], "memory": result["memory"], "event": result["event"]}
        if result["event"] == "UPDATE":
            event["previous_memory"] = result.get("previous_memory")
        return event

    def _shaped(self, found: Mapping[str, Any], relations: list[Any], *, score: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"results": [mem0_item(i, score=score) for i in found["results"]]}
        if self._reads.graph is not None:
            out["relations"] = relations
        return out


def _seconds(timeout: object) -> float:
    """A wait's timeout in seconds: a positive finite number.

    Raises:
        InvalidOption: anything else.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise InvalidOption(f"timeout must be a positive number of seconds, got {str(timeout)[:40]!r}", field="timeout")
    return float(timeout)


def _graph_events(relations: Sequence[Mapping[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
    """A job's relations in the shape of Mem0's graph add result (one list per relation, ``target`` for
    the destination): added ones, and the contradicted ones (``valid: false``) as deleted."""
    def edge(r: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"source": r["source"], "relationship": r["relationship"], "target": r["destination"]}]

    return {"deleted_entities": [edge(r) for r in relations if r.get("valid") is False],
            "added_entities": [edge(r) for r in relations if r.get("valid") is not False]}


class AsyncMemory:
    """`Memory` for asyncio code: the same methods, each run in a worker thread (`asyncio.to_thread`).

    Args: as `Memory`.
    """

    def __init__(self, settings: Settings | None = None, **kwargs: Any) -> None:
        self.sync = Memory(settings, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)
        if name.startswith("_") or not callable(method):
            raise AttributeError(name)

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

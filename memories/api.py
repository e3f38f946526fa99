"""Synchronous reads of memories, in memq's full shapes; no queue is involved (writes, deletes included,
are jobs: see `memories.client.Memory`).

`search` embeds the query (one call) and queries Qdrant with the scope as a filter and, with graph
memory on, Neo4j for the valid relations of the entities most related to the query, both at once.
Results come in Mem0's shape: ``{"results": [item, ...], "relations": [{source, relationship,
destination}, ...]}``.

**Scope on every call.** Each read and delete takes the caller's scope (``user_id`` / ``agent_id`` /
``run_id``, at least one), with Mem0's read semantics: a memory is visible when every id the caller
gives equals the memory's (`Scope.covers`). Id-based calls (`get`, `history`) answer for a memory
outside the caller's scope exactly as for an unknown id (None, []), so a caller cannot even learn
that it exists.

Stores are opened on first use: `history` needs only the SQL database (no embedder, no vector store),
`get` no embedder. In embedded mode the vector store belongs to one process, the worker;
any other process reads through it over Redis (`stores.vector_open`), so these helpers work while
workers run. With ``open_embedded=True`` (the CLI) a process that finds no worker opens the folder itself.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any

from memq.checks import MAX_RESULTS, check_list_args, check_search_args, check_time_range
from memq.filters import parse_filters
from memq.config import Settings, load_settings
from memq.errors import InvalidRequest, InvalidSearch
from memq.models import MemoryEvent, MemoryItem, Scope, utcnow
from memq.scope import make_scope
from stores.embedder import Embedder, get_embedder
from stores.history import HistoryRecord, HistoryStore, open_history_store
from stores.vector_open import open_vector_store
from stores.occurred import TimeRange
from stores.vectors import VectorStore

if TYPE_CHECKING:
    from stores.graph import GraphStore

__all__ = ["MAX_OFFSET", "Memories"]

MAX_OFFSET = 10_000
"""Deepest page `Memories.get_all` reads (memories skipped); beyond it, narrow with filters."""

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memq-graph-search")
        return _executor


def _item(item: MemoryItem) -> dict[str, Any]:
    dumped: dict[str, Any] = item.model_dump(mode="json")
    return dumped


class Memories:
    """Reads over one process's stores, each checked against the caller's scope.

    Args:
        settings: memq settings (the environment's when omitted). Stores are the process-wide
            instances for these settings (shared with a worker running in the same process).
        open_embedded: in embedded mode, when no worker owns the vector store, open its folder in this
            process (for short-lived commands; a worker started meanwhile is refused until it ends).
            False: such a read raises `NoStoreOwner`.
    """

    def __init__(self, settings: Settings | None = None, *, open_embedded: bool = False) -> None:
        self.settings = settings or load_settings()
        self.open_embedded = open_embedded

    # --- stores, opened on first use ----------------------------------------------------------

    @cached_property
    def embedder(self) -> Embedder:
        """The embedder (loads the model on first use)."""
        return get_embedder(self.settings.embedder)

    @cached_property
    def vectors(self) -> VectorStore:
        """The vector store: a Qdrant server's, this process's own, or the owner's over Redis."""
        return open_vector_store(self.settings.qdrant, self.settings.embedder.dims, role="reader",
                                 redis_url=self.settings.redis.url, own_if_free=self.open_embedded)

    @cached_property
    def history_store(self) -> HistoryStore:
        """The SQL history store."""
        assert self.settings.history.url is not None
        return open_history_store(self.settings.history.url)

    @cached_property
    def graph(self) -> GraphStore | None:
        """The Neo4j graph store, or None when graph memory is off."""
        if self.settings.neo4j.uri is None:
            return None
        from stores.graph import open_graph_store

        return open_graph_store(self.settings, role="reader", own_if_free=self.open_embedded)

    def _scope(self, user_id: object, agent_id: object, run_id: object) -> Scope:
        return make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                          max_chars=self.settings.limits.max_scope_id_chars)

    # --- reads --------------------------------------------------------------------------------

    def search(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None, limit: int = 100, filters: Mapping[str, Any] | None = None,
               threshold: float | None = None, top_k: int | None = None,
               rerank: bool = True, after: object = None, before: object = None) -> dict[str, list[dict[str, Any]]]:
        """Memories of a scope by meaning.

        Args:
            query: the text to search for (non-empty).
            user_id, agent_id, run_id: the caller's scope; at least one.
            limit: at most this many results (1..1000).
            filters: Mem0's filters (`memq.filters`): ``{"topic": "food"}``, ``{"n": {"gte": 2}}``,
                ``{"created_at": {"gte": "2024-05-01"}}``, ``{"OR": [...]}``, ``{"actor_id": "*"}``...; they only
                narrow the caller's scope.
            threshold: minimum cosine similarity (-1..1).

            With hybrid retrieval on (``MEMQ_QDRANT__HYBRID``, the default), the dense ranking is fused
            with the query's BM25 keyword matches (`stores.sparse`): results come in the fused order
            and each ``score`` is still the memory's cosine similarity to the query.
            top_k: Mem0's hosted name for `limit` (when given, it is the limit).
            rerank: with a rerank model configured (``MEMQ_RERANK__MODEL``), reorder the best
                ``max(limit, rerank.candidates)`` hits by the model and keep the best `limit`; each then
                carries ``rerank_score`` (`memories.rerank`). No effect without a model, as in Mem0.
            after, before: a time range on ``occurred_at`` (the date each memory's fact refers to):
                ``after <= occurred_at < before`` (after inclusive, before exclusive); each a `date`
                (midnight UTC), a `datetime` (naive means UTC) or an ISO-8601 string; either may be
                None. With a bound given, memories without ``occurred_at`` (written before temporal
                grounding, or with it off) are left out. Applied in the same Qdrant query as the
                scope and filters (a ``Range`` on ``occurred_ts``), so `limit` counts only matches.

        Returns:
            ``{"results": [{id, memory, hash, metadata, score, created_at, updated_at, user_id, agent_id,
            run_id, actor_id, role, source_message_ids, occurred_at}], "relations": [{source,
            relationship, destination}]}``, results best first (best score first when dense only);
            relations empty when graph memory is off; ``occurred_at`` None when unknown.

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
            InvalidSearch: an empty or too long query, a bad limit or threshold.
            InvalidFilter: filters that do not parse: an unknown operator or logical key, a bad operand.
            InvalidTimeRange: `after` or `before` is not a date, or `after` is not earlier than `before`.
            NoStoreOwner: embedded mode, no worker owns the vector store and `open_embedded` is False.
            StoreUnavailable: Qdrant or Neo4j is unreachable, or the store's owner did not answer in time.
            LLMUnavailable, LLMOutputError: the rerank model failed (the search fails: no silent fallback).
        """
        limit = limit if top_k is None else top_k
        check_search_args(query, limit=limit, threshold=threshold, limits=self.settings.limits)
        parse_filters(filters)  # refuse bad filters before embedding
        start, end = check_time_range(after, before)
        during = TimeRange(start, end) if start is not None or end is not None else None
        filters = _jsonable(filters)
        scope = self._scope(user_id, agent_id, run_id)
        vector = self.embedder.embed([query])[0]
        graph = self.graph
        related = _pool().submit(graph.search, scope, vector, query) if graph is not None else None
        reranking = rerank and self.settings.rerank.model is not None
        wanted = min(max(limit, self.settings.rerank.candidates), MAX_RESULTS) \
            if reranking else limit
        hits = self.vectors.search(vector, scope, limit=wanted, threshold=threshold, filters=filters,
                                   text=query if self.settings.qdrant.hybrid else None, during=during)
        results = [_item(h) for h in hits]
        if reranking and results:
            from memories.rerank import rerank as rerank_hits

            order = rerank_hits(self.settings.rerank, query, [h.memory for h in hits])
            results = [{**results[i], "rerank_score": score} for i, score in order[:limit]]
        relations = [r.triple() for r in (related.result() if related is not None else [])]
        return {"results": results, "relations": relations}

    def get_all(self, *, user_id: str | None = None, agent_id: str | None = None, run_id: str | None = None,
                limit: int = 100, filters: Mapping[str, Any] | None = None, offset: int = 0,
                top_k: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """A page of a scope's memories, oldest first (``created_at``, then id), in the shape of `search`
        (no scores). Page through with ``offset`` = 0, `limit`, 2 × `limit`, ... (pages are stable).

        Args:
            limit: at most this many (1..1000); `top_k` is Mem0's hosted name for it.
            filters: as for `search`.
            offset: memories to skip (0..`MAX_OFFSET`).

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
            InvalidSearch, InvalidFilter: a bad limit, offset or filter.
        """
        limit = limit if top_k is None else top_k
        check_list_args(limit=limit)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
            raise InvalidSearch(f"offset must be an int in 0..{MAX_OFFSET}", field="offset")
        parse_filters(filters)
        scope = self._scope(user_id, agent_id, run_id)
        page = self.vectors.list(scope, limit=limit, filters=_jsonable(filters), offset=offset)
        return {"results": [_item(m) for m in page], "relations": []}

    def _owned(self, memory_id: str, scope: Scope) -> MemoryItem | None:
        if not isinstance(memory_id, str) or not memory_id:
            raise InvalidRequest("memory_id must be a non-empty string", field="memory_id")
        if not _is_uuid(memory_id):
            return None  # memory ids are UUIDs: anything else is unknown
        items = self.vectors.retrieve([str(uuid.UUID(memory_id))])
        if not items or not scope.covers(items[0].user_id, items[0].agent_id, items[0].run_id):
            return None
        return items[0]

    def get(self, memory_id: str, *, user_id: str | None = None, agent_id: str | None = None,
            run_id: str | None = None) -> dict[str, Any] | None:
        """One memory by id, or None when there is none in the caller's scope.

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
        """
        item = self._owned(memory_id, self._scope(user_id, agent_id, run_id))
        return _item(item) if item is not None else None

    def history(self, memory_id: str, *, user_id: str | None = None, agent_id: str | None = None,
                run_id: str | None = None) -> list[dict[str, Any]]:
        """A memory's events, oldest first, as far as the caller's scope covers them: ``[{id, memory_id,
        old_memory, new_memory, event, created_at, updated_at, is_deleted, actor_id, role, job_id,
        user_id, agent_id, run_id}]`` ([] for an unknown id or another scope's memory). Reads SQL only.

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
        """
        scope = self._scope(user_id, agent_id, run_id)
        if not isinstance(memory_id, str) or not memory_id:
            raise InvalidRequest("memory_id must be a non-empty string", field="memory_id")
        if not _is_uuid(memory_id):
            return []  # memory ids are UUIDs: anything else is unknown
        rows = self.history_store.history(str(uuid.UUID(memory_id)))
        return [h.model_dump(mode="json") for h in rows if scope.covers(h.user_id, h.agent_id, h.run_id)]

    def owners(self, memory_ids: Sequence[str], scope: Scope) -> dict[str, Scope]:
        """The exact scope of each memory the caller's `scope` covers (ids it does not cover, unknown
        ids and non-UUID strings are left out): where an edit of it must be enqueued.

        Raises:
            StoreUnavailable: the vector store is unreachable.
        """
        wanted = [str(uuid.UUID(m)) for m in dict.fromkeys(memory_ids) if _is_uuid(m)]
        found = self.vectors.retrieve(wanted) if wanted else []
        return {m.id: Scope(user_id=m.user_id, agent_id=m.agent_id, run_id=m.run_id)
                for m in found if scope.covers(m.user_id, m.agent_id, m.run_id)}


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def _jsonable(value: Any) -> Any:
    """Filters with datetimes written as ISO-8601 (they may travel to the store's owner as JSON)."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value.isoformat() if isinstance(value, datetime) else value

"""Synchronous reads: search by meaning, get, get_all and history. No queue is involved.

`search` embeds the query (one call) and queries Qdrant with the scope as a filter and, with graph
memory on, Neo4j for the valid relations of the entities most related to the query, both at once.
Results come in Mem0's shape: ``{"results": [item, ...], "relations": [{source, relationship,
destination}, ...]}``.

In embedded mode (Qdrant local mode) the store belongs to one process: run these helpers inside the
worker's process (as the tests do) or while no worker runs (as ``memq search`` and the demo do).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memq.checks import check_list_args, check_search_args
from memq.config import Settings, load_settings
from memq.errors import InvalidRequest
from memq.scope import make_scope
from pipeline.clients import Clients, build_clients


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memq-graph-search")
        return _executor


def _item(item: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = item.model_dump(mode="json")
    return dumped


class MemorySearch:
    """Read helpers over a process's stores.

    Args:
        clients: the process's clients (`build_clients(settings)`).
    """

    def __init__(self, clients: Clients) -> None:
        self._c = clients

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> MemorySearch:
        """Build from settings (the environment's when omitted)."""
        return cls(build_clients(settings or load_settings()))

    def search(self, query: str, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None, limit: int = 100, filters: Mapping[str, Any] | None = None,
               threshold: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Memories of a scope by meaning.

        Args:
            query: the text to search for (non-empty).
            user_id, agent_id, run_id: the scope; at least one.
            limit: at most this many results (1..1000).
            filters: metadata equality filters (``{"topic": "food"}`` or ``{"topic": ["a", "b"]}``).
            threshold: minimum cosine similarity (-1..1).

        Returns:
            ``{"results": [{id, memory, hash, metadata, score, created_at, updated_at, user_id, agent_id,
            run_id, actor_id, role, source_message_ids}], "relations": [{source, relationship,
            destination}]}``, results best score first; relations empty when graph memory is off.

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
            InvalidRequest: empty query, bad limit, or a filter on a key memq owns.
            StoreUnavailable: Qdrant or Neo4j is unreachable, or Qdrant's folder is held by another process.
        """
        check_search_args(query, limit=limit, threshold=threshold, filters=filters, limits=self._c.settings.limits)
        scope = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                           max_chars=self._c.settings.limits.max_scope_id_chars)
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequest("query must be a non-empty string", field="query")
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", field="limit")
        vector = self._c.embedder.embed([query])[0]
        graph = self._c.graph
        related = _pool().submit(graph.search, scope, vector, query) if graph is not None else None
        hits = self._c.vectors.search(vector, scope, limit=limit, threshold=threshold, filters=filters)
        relations = [{"source": r.source, "relationship": r.relationship, "destination": r.destination}
                     for r in (related.result() if related is not None else [])]
        return {"results": [_item(h) for h in hits], "relations": relations}

    def get(self, memory_id: str) -> dict[str, Any] | None:
        """One memory by id, or None if there is none."""
        items = self._c.vectors.retrieve([memory_id])
        return _item(items[0]) if items else None

    def get_all(self, *, user_id: str | None = None, agent_id: str | None = None, run_id: str | None = None,
                limit: int = 100, filters: Mapping[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Up to `limit` memories of a scope, oldest first, in the shape of `search` (no scores).

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
        """
        check_list_args(limit=limit, filters=filters)
        scope = make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                           max_chars=self._c.settings.limits.max_scope_id_chars)
        return {"results": [_item(m) for m in self._c.vectors.list(scope, limit=limit, filters=filters)],
                "relations": []}

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """A memory's events, oldest first: ``[{id, memory_id, old_memory, new_memory, event, created_at,
        updated_at, is_deleted, actor_id, role, job_id, user_id, agent_id, run_id}]``."""
        return [h.model_dump(mode="json") for h in self._c.history.history(memory_id)]

"""The vector store's interface and the one place memory <-> payload is mapped, for every backend.

Backends: `stores.edge.EdgeStore` (Qdrant Edge in-process, the embedded default), `stores.qdrant.
QdrantClientStore` (a Qdrant server through `qdrant-client`, production) and `stores.vector_rpc.
RemoteVectorStore` (a process that is not the embedded store's owner asks the owner over Redis).
`stores.vector_open.open_vector_store` picks one.

Payload of a point (Mem0's keys): ``data`` (the memory text), ``hash`` (md5 of the text), ``created_at``/
``updated_at`` (ISO-8601 UTC), the scope ids that are set (``user_id``/``agent_id``/``run_id``),
``actor_id``, ``role``, ``source_message_ids``, ``job_id`` and the caller's metadata keys at the top level
(as Mem0 stores them). A collection written by Mem0 reads as memq memories.

Temporal grounding adds ``occurred_at`` (ISO-8601 UTC: the date the fact refers to) and ``occurred_ts``
(the same moment in epoch seconds, a float with a payload index on every backend) so that a search's
time range (`TimeRange`) is one ``Range`` condition in the same query. Points written before it (or
with grounding off) have neither field: they read with ``occurred_at`` None and no time range selects them.
"""

from __future__ import annotations

import builtins
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import JsonValue

from memq.errors import StoreError
from memq.filters import Logic, Match, Node, evaluate, has_op, parse_filters, relax
from memq.models import MemoryItem, Scope
from stores.occurred import OCCURRED_TS, TimeRange, stored_moment

SCOPE_KEYS = ("user_id", "agent_id", "run_id")
CORE_KEYS = frozenset({"data", "hash", "created_at", "updated_at", *SCOPE_KEYS, "actor_id", "role",
                       "source_message_ids", "job_id", "occurred_at", "occurred_ts"})
KEYWORD_INDEXES = (*SCOPE_KEYS, "actor_id")
"""Payload fields with a keyword index (every backend); ``created_at`` has a datetime index."""
def memory_hash(text: str) -> str:
    """md5 hex digest of a memory's text (Mem0's ``hash``)."""
    return hashlib.md5(text.encode()).hexdigest()


@dataclass(frozen=True)
class MemoryPoint:
    """A memory to write: point id, vector and the fields that become its payload.

    Attributes:
        id: point id (a UUID string, deterministic per job and decision).
        vector: the embedding of `memory` (`dims` floats).
        memory: the memory text.
        scope: whose memory it is.
        created_at, updated_at: timestamps (UTC).
        metadata: caller metadata (JSON values; reserved keys refused by the producer).
        actor_id, role: the speaker of the source messages, when known.
        source_message_ids: provenance (caller's message ids or positions).
        job_id: the job that last wrote the point.
        occurred_at: the date the memory refers to (UTC), or None (no ``occurred_*`` payload fields).
    """

    id: str
    vector: Sequence[float]
    memory: str
    scope: Scope
    created_at: datetime
    updated_at: datetime | None
    metadata: Mapping[str, JsonValue]
    actor_id: str | None
    role: str | None
    source_message_ids: Sequence[str]
    job_id: str
    occurred_at: datetime | None = None

    def payload(self) -> dict[str, Any]:
        """The point's payload (Mem0 keys)."""
        payload: dict[str, Any] = dict(self.metadata)
        payload.update({
            "data": self.memory,
            "hash": memory_hash(self.memory),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            **self.scope.as_filter(),
            "actor_id": self.actor_id,
            "role": self.role,
            "source_message_ids": list(self.source_message_ids),
            "job_id": self.job_id,
        })
        if self.occurred_at is not None:
            payload["occurred_at"] = self.occurred_at.isoformat()
            payload[OCCURRED_TS] = self.occurred_at.timestamp()
        return payload


def to_item(point_id: object, payload: Mapping[str, Any] | None, score: float | None = None) -> MemoryItem:
    """Read a point back as a `MemoryItem` (metadata = the payload keys memq does not own)."""
    p = dict(payload or {})
    return MemoryItem(
        id=str(point_id),
        memory=p.get("data", ""),
        hash=p.get("hash", ""),
        metadata={k: v for k, v in p.items() if k not in CORE_KEYS},
        score=score,
        created_at=p.get("created_at"),
        updated_at=p.get("updated_at"),
        user_id=p.get("user_id"),
        agent_id=p.get("agent_id"),
        run_id=p.get("run_id"),
        actor_id=p.get("actor_id"),
        role=p.get("role"),
        source_message_ids=p.get("source_message_ids") or [],
        occurred_at=stored_moment(p.get("occurred_at")),
    )


@dataclass(frozen=True)
class Selection:
    """What a read selects, split for the backend.

    Attributes:
        pushed: the tree the backend applies (the scope, and the filters it can express), or None.
        post: the filters again when they hold a condition no backend expresses (``icontains``), for
            `evaluate` on what the backend returns; None otherwise.
    """

    pushed: Node | None
    post: Node | None = None


def python_only(match: Match) -> bool:
    """Conditions no backend applies: ``icontains`` (Qdrant has no case-insensitive substring match)."""
    return match.op == "icontains"


def select(scope: Scope | None, filters: Mapping[str, Any] | None = None, *, exact: bool = False,
           unsupported: Callable[[Match], bool] = python_only, during: TimeRange | None = None) -> Selection:
    """The selection of a scope's memories that also match Mem0-style `filters` (`memq.filters`).

    Args:
        scope: every id that is set must match (Mem0's read semantics); None selects every point.
        filters: Mem0-style filters; they are ANDed with the scope, so they can only narrow it.
        exact: the ids that are not set must be absent too, so only memories whose scope equals
            `scope` match (what a job decides over and writes to).
        unsupported: the conditions the backend cannot apply; they are evaluated in Python on what it
            returns (`post_filtered`).
        during: only memories whose ``occurred_at`` lies in this range (a numeric range on
            `OCCURRED_TS`, pushed to the backend with the rest).

    Raises:
        InvalidFilter: filters that do not parse (`memq.filters.parse_filters`).
    """
    parts: list[Node] = []
    if scope is not None:
        parts += [Match(k, "eq", v) for k, v in scope.as_filter().items()]
        if exact:
            parts += [Match(k, "empty") for k in SCOPE_KEYS if getattr(scope, k) is None]
    parsed = parse_filters(filters)
    post = parsed if has_op(parsed, unsupported) else None
    pushable = relax(parsed, unsupported) if post is not None and parsed is not None else parsed
    if pushable is not None:
        parts.append(pushable)
    window = during.node() if during is not None else None
    if window is not None:
        parts.append(window)
    return Selection(Logic("and", tuple(parts)) if parts else None, post)


Q = TypeVar("Q")


@dataclass(frozen=True)
class Probe:
    """One search of a batch: the query's dense vector and, for hybrid retrieval, its text.

    Attributes:
        vector: the query's embedding (`dims` floats, unit length).
        text: the query text, whose BM25 terms (`stores.sparse`) are fused with the dense ranking;
            None searches by the vector alone.
    """

    vector: Sequence[float]
    text: str | None = None


def probes(vectors: Sequence[Sequence[float]], texts: Sequence[str] | None) -> list[Probe]:
    """The searches of a batch: one `Probe` per vector, with its text when `texts` is given.

    Raises:
        StoreError: `texts` is not one text per vector.
    """
    if texts is None:
        return [Probe(v) for v in vectors]
    if len(texts) != len(vectors):
        raise StoreError(f"{len(texts)} query texts for {len(vectors)} vectors")
    return [Probe(v, t) for v, t in zip(vectors, texts)]


def searched(run: Callable[[Sequence[Q], int], list[list[MemoryItem]]],
             queries: Sequence[Q], selection: Selection, limit: int) -> list[list[MemoryItem]]:
    """The hits of a batch of searches: ``run(queries, n)`` (the first `n` hits of each query) in one
    batch when the backend applies the whole selection, else each query's hits on their own, checked
    by `post_filtered`."""
    post = selection.post
    if post is None:
        return run(queries, limit)
    def alone(query: Q) -> Callable[[int], list[MemoryItem]]:
        return lambda n: run([query], n)[0]

    return [post_filtered(alone(q), post, limit) for q in queries]


def payload_of(item: MemoryItem) -> dict[str, Any]:
    """The payload fields of a read memory, as `memq.filters.evaluate` reads them."""
    payload: dict[str, Any] = dict(item.metadata)
    payload.update({
        "data": item.memory, "hash": item.hash,
        "created_at": item.created_at.isoformat() if item.created_at else None,
        "updated_at": item.updated_at.isoformat() if item.updated_at else None,
        "user_id": item.user_id, "agent_id": item.agent_id, "run_id": item.run_id,
        "actor_id": item.actor_id, "role": item.role, "source_message_ids": list(item.source_message_ids),
        "occurred_at": item.occurred_at.isoformat() if item.occurred_at else None,
        OCCURRED_TS: item.occurred_at.timestamp() if item.occurred_at else None})
    return payload


@dataclass(frozen=True)
class Spelling:
    """How one backend spells filter conditions (`translate` walks the tree with it).

    Attributes:
        filter: ``(must, should, must_not) -> filter`` (each a list of conditions, or None).
        match: ``(key, value) -> condition``: equality on a string, integer or boolean.
        match_any: ``(key, values) -> condition``: equality with one of the values.
        number: ``(key, {"gte": 2.0, ...}) -> condition``: a numeric range.
        date: ``(key, {"gte": datetime, ...}) -> condition``: a datetime range.
        substring: ``(key, text) -> condition``: a case-sensitive substring match.
        empty: ``key -> condition``: the field is absent, null or [].
    """

    filter: Callable[[list[Any] | None, list[Any] | None, list[Any] | None], Any]
    match: Callable[[str, Any], Any]
    match_any: Callable[[str, list[Any]], Any]
    number: Callable[[str, dict[str, float]], Any]
    date: Callable[[str, dict[str, datetime]], Any]
    substring: Callable[[str, str], Any]
    empty: Callable[[str], Any]


def translate(node: Node | None, spell: Spelling) -> Any:
    """A backend's filter for a `memq.filters` tree (None selects everything).

    ``ne``/``nin`` are ``must_not`` (memories without the field match, as `memq.filters.evaluate`
    says); a float equality is a closed range; ``exists`` is "not empty". ``icontains`` never gets here
    (`select` evaluates it in Python).

    Raises:
        StoreError: an operator the backend was not meant to receive.
    """
    if node is None:
        return None
    top = _spelled(node, spell)
    return top if isinstance(node, Logic) else spell.filter([top], None, None)


def _spelled(node: Node, spell: Spelling) -> Any:
    if isinstance(node, Logic):
        parts = [_spelled(p, spell) for p in node.parts]
        return spell.filter(parts if node.kind == "and" else None, parts if node.kind == "or" else None,
                            parts if node.kind == "not" else None)
    key, op, value = node.key, node.op, node.value
    negated = op in ("ne", "nin")
    if op in ("eq", "ne"):
        cond = spell.number(key, {"gte": value, "lte": value}) if isinstance(value, float) else spell.match(key, value)
    elif op in ("in", "nin"):
        cond = spell.match_any(key, list(value))
    elif op in ("gt", "gte", "lt", "lte"):
        cond = spell.date(key, {op: value}) if isinstance(value, datetime) else spell.number(key, {op: float(value)})
    elif op == "contains":
        cond = spell.substring(key, value)
    elif op in ("exists", "empty"):
        cond, negated = spell.empty(key), op == "exists"
    else:
        raise StoreError(f"filter operator {op!r} reached the backend")
    return spell.filter(None, None, [cond]) if negated else cond


def post_filtered(fetch: Callable[[int], list[MemoryItem]], post: Node | None, limit: int) -> list[MemoryItem]:
    """Up to `limit` items of ``fetch(n)`` (the first `n` candidates, in the read's order) that match
    `post`, asking for 4x more candidates each round until enough match or the candidates run out (at
    worst the whole selection: such reads cost time linear in the scope)."""
    if post is None:
        return fetch(limit)
    n = max(limit * 4, 64)
    while True:
        candidates = fetch(n)
        kept = [i for i in candidates if evaluate(post, payload_of(i))]
        if len(kept) >= limit or len(candidates) < n:
            return kept[:limit]
        n *= 4


def oldest_first(items: Sequence[MemoryItem]) -> list[MemoryItem]:
    """`items` sorted by ``created_at`` (missing last), then id: the order `VectorStore.list` returns."""
    return sorted(items, key=lambda m: (m.created_at is None, m.created_at, m.id))


class VectorStore(ABC):
    """Memories as points of one collection: the operations every backend provides.

    Attributes:
        collection: the collection's name.
        dims: vector size (the embedder's dimensions).

    Every method may raise `StoreUnavailable` (the store is unreachable: retryable) or `StoreError`
    (a permanent fault, e.g. a vector of the wrong size).
    """

    collection: str
    dims: int

    @abstractmethod
    def ensure_collection(self) -> None:
        """Create the collection (cosine, `dims`, payload indexes) if it does not exist.

        Raises:
            StoreError: the collection exists with another vector size.
        """

    @abstractmethod
    def upsert(self, points: Sequence[MemoryPoint]) -> None:
        """Write points (insert or overwrite by id; idempotent)."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id (missing ids are ignored)."""

    @abstractmethod
    def retrieve(self, ids: Sequence[str]) -> list[MemoryItem]:
        """Memories by id (missing ids are skipped)."""

    def search(self, vector: Sequence[float], scope: Scope, *, limit: int, threshold: float | None = None,
               filters: Mapping[str, Any] | None = None, text: str | None = None,
               during: TimeRange | None = None) -> list[MemoryItem]:
        """The `limit` memories of `scope` nearest to `vector`, best first, each with its cosine `score`.

        Args:
            text: the query's text: the dense ranking is fused with the text's BM25 matches (hybrid
                retrieval, `stores.sparse`); results then come in the fused order, each still scored
                by its cosine similarity to `vector`, and `threshold` still bounds that similarity.
                None (or a store without sparse vectors): dense only.
            during: only memories whose ``occurred_at`` lies in the range (`TimeRange`), in the same query.

        Raises:
            InvalidFilter: filters that do not parse (`memq.filters`).
        """
        return self.search_batch([vector], scope, limit=limit, threshold=threshold, filters=filters,
                                 texts=[text] if text is not None else None, during=during)[0]

    @abstractmethod
    def search_batch(self, vectors: Sequence[Sequence[float]], scope: Scope, *, limit: int,
                     threshold: float | None = None, filters: Mapping[str, Any] | None = None,
                     exact: bool = False, texts: Sequence[str] | None = None,
                     during: TimeRange | None = None) -> list[list[MemoryItem]]:
        """`search` for several vectors at once; one list of hits per vector.

        Args:
            exact: only memories whose scope equals `scope` (see `select`).
            texts: one query text per vector for hybrid retrieval (see `search`), or None.
            during: only memories whose ``occurred_at`` lies in the range (see `select`).
        """

    @abstractmethod
    def list(self, scope: Scope, *, limit: int = 100, filters: Mapping[str, Any] | None = None,
             offset: int = 0, exact: bool = False) -> list[MemoryItem]:
        """A page of the memories of `scope`: oldest first by ``created_at`` (then id), skipping `offset`.

        Args:
            exact: only memories whose scope equals `scope` (see `select`).

        Raises:
            InvalidFilter: filters that do not parse (`memq.filters`).
        """

    def scopes(self, scope: Scope) -> builtins.list[Scope]:
        """The exact scopes of the memories `scope` covers (``user_id=alice`` may cover alice's own
        memories and alice-with-agent-bot's), in the order their oldest memory was written. Reads every
        covered memory once (an edit that spans a scope, ``delete_all``, is fanned out to each).
        """
        found: dict[tuple[str | None, str | None, str | None], None] = {}
        for m in self.list(scope, limit=max(1, self.count(scope))):
            found.setdefault((m.user_id, m.agent_id, m.run_id))
        return [Scope(user_id=u, agent_id=a, run_id=r) for u, a, r in found]

    @abstractmethod
    def count(self, scope: Scope | None = None) -> int:
        """Number of points (of `scope`, or all)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (an embedded store's folder is free for another process afterwards)."""


class PagedVectorStore(VectorStore):
    """A store that reads its own engine (Edge, `qdrant-client`): pages and Python-side filters are
    built here on two primitives, `oldest` and `count_of`. (`RemoteVectorStore` asks the owner instead.)"""

    def list(self, scope: Scope, *, limit: int = 100, filters: Mapping[str, Any] | None = None,
             offset: int = 0, exact: bool = False) -> list[MemoryItem]:
        """A page of the memories of `scope`: oldest first by ``created_at`` (then id), skipping `offset`.
        With `exact`, only memories whose scope equals `scope`.

        Pages are stable: memories with the same ``created_at`` (a backfill writes many) are ordered by
        id, and all of them are read when a page boundary falls among them.

        Raises:
            InvalidFilter: filters that do not parse (`memq.filters`).
        """
        selection = select(scope, filters, exact=exact, unsupported=self.unsupported)
        wanted = offset + limit
        items = post_filtered(
            lambda n: oldest_first(self._all_tied(selection.pushed, self.oldest(selection.pushed, n), n)),
            selection.post, wanted)
        return oldest_first(items)[offset:offset + limit]

    def _all_tied(self, pushed: Node | None, items: builtins.list[MemoryItem], n: int) -> builtins.list[MemoryItem]:
        """`items` (the `n` oldest) with every memory that shares the last one's ``created_at``, so a
        page boundary among equal times cuts the same place every time (ties are then ordered by id)."""
        if len(items) < n or not items or items[-1].created_at is None:
            return items
        edge = items[-1].created_at
        tied = Logic("and", (*([pushed] if pushed else []), Match("created_at", "gte", edge),
                             Match("created_at", "lte", edge)))
        return [i for i in items if i.created_at != edge] + self.oldest(tied, self.count_of(tied))

    @abstractmethod
    def count_of(self, node: Node | None) -> int:
        """How many points match `node` (at least 1, a valid scroll limit)."""

    def unsupported(self, match: Match) -> bool:
        """Conditions this backend cannot apply (evaluated in Python on what it returns)."""
        return python_only(match)

    @abstractmethod
    def oldest(self, node: Node | None, n: int) -> builtins.list[MemoryItem]:
        """The `n` oldest points matching `node` by ``created_at`` (any order among equal times)."""


def dense_of(vector: object) -> Sequence[float] | None:
    """A returned point's dense vector: the engines give the unnamed vector alone (a list) or within
    a mapping of vector names (under ``""``); None when it is absent."""
    if isinstance(vector, dict):
        vector = vector.get("")
    return vector if isinstance(vector, list) else None


def fused_hits(query: Sequence[float], found: Sequence[tuple[object, Mapping[str, Any] | None, Sequence[float] | None]],
               threshold: float | None) -> list[MemoryItem]:
    """The hits of a fused (hybrid) search, in the fusion's order, each scored by its cosine similarity
    to the query (what `score` means in a dense search, so thresholds keep their meaning).

    Args:
        query: the query's dense vector.
        found: ``(point id, payload, dense vector)`` per fused hit, best first (a hit without its
            vector keeps no score and is dropped when `threshold` is set).
        threshold: minimum cosine similarity; hits only BM25 found may fall under it and are dropped.

    Returns:
        The kept hits as `MemoryItem` with ``score`` = cosine similarity.
    """
    import numpy as np

    q = np.asarray(query, dtype=np.float32)
    q_norm = float(np.linalg.norm(q)) or 1.0
    kept: list[MemoryItem] = []
    for point_id, payload, dense in found:
        score: float | None = None
        if dense is not None and len(dense) == len(q):
            d = np.asarray(dense, dtype=np.float32)
            score = float(d @ q) / (q_norm * (float(np.linalg.norm(d)) or 1.0))
        if threshold is not None and (score is None or score < threshold):
            continue
        kept.append(to_item(point_id, payload, score))
    return kept

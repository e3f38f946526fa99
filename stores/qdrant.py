"""A Qdrant server through `qdrant-client`: the production vector store (``MEMQ_QDRANT__URL``).

`QdrantClientStore` also drives `qdrant-client`'s local mode (a folder, one process, a pure-Python scan),
which memq uses only to read a folder written by memq before the Edge store (`memq migrate-store`) and
to run the backend's contract tests where no server is reachable. Payload indexes: keyword on the scope
ids and ``actor_id``, datetime on ``created_at`` (server only; local mode has none).
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import httpx
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from memq.config import QdrantSettings
from memq.errors import StoreError, StoreUnavailable
from memq.models import MemoryItem, Scope
from memq.filters import Node
from stores.sparse import RRF_K, SPARSE_NAME, document_terms, fusion_depth, query_terms
from stores.occurred import OCCURRED_TS, TimeRange
from stores.vectors import (KEYWORD_INDEXES, MemoryPoint, PagedVectorStore, Probe, Spelling, dense_of, fused_hits,
                            probes, searched, select, to_item, translate)

__all__ = ["QdrantClientStore", "qdrant_filter", "connect_server"]

logger = logging.getLogger(__name__)


QDRANT = Spelling(
    filter=lambda must, should, must_not: qm.Filter(must=must, should=should, must_not=must_not),
    match=lambda key, value: qm.FieldCondition(key=key, match=qm.MatchValue(value=value)),
    match_any=lambda key, values: qm.FieldCondition(key=key, match=qm.MatchAny(any=values)),
    number=lambda key, bounds: qm.FieldCondition(key=key, range=qm.Range(**bounds)),
    date=lambda key, bounds: qm.FieldCondition(key=key, range=qm.DatetimeRange(**bounds)),
    substring=lambda key, text: qm.FieldCondition(key=key, match=qm.MatchSubstring(substring=text)),
    empty=lambda key: qm.IsEmptyCondition(is_empty=qm.PayloadField(key=key)),
)
"""`qdrant-client`'s conditions (``contains`` is ``MatchSubstring``; ``MatchText`` matches whole words)."""


def qdrant_filter(node: Node | None) -> qm.Filter | None:
    """`qdrant-client`'s filter for a `memq.filters` tree (`stores.vectors.translate`; None: everything)."""
    flt: qm.Filter | None = translate(node, QDRANT)
    return flt


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except UnexpectedResponse as exc:
        if exc.status_code is not None and exc.status_code >= 500:
            raise StoreUnavailable(f"Qdrant {what}: HTTP {exc.status_code}") from exc
        raise StoreError(f"Qdrant {what}: HTTP {exc.status_code}") from exc  # the body may quote payloads
    except (ResponseHandlingException, httpx.TransportError, ConnectionError, TimeoutError) as exc:
        raise StoreUnavailable(f"Qdrant {what}: {type(exc).__name__}") from exc
    except (ValueError, AssertionError) as exc:
        raise StoreError(f"Qdrant {what}: {type(exc).__name__}") from exc


class QdrantClientStore(PagedVectorStore):
    """Memories in one collection of a Qdrant server (or of `qdrant-client` local mode).

    Args:
        client: a `QdrantClient` (server or local mode).
        collection: collection name.
        dims: vector size (the embedder's dimensions).
        lock: serializes calls (local mode); None for a server client.
        indexed: create payload indexes on the scope ids (server mode; local mode ignores them).
    """

    def __init__(self, client: QdrantClient, collection: str, dims: int,
                 lock: threading.RLock | None = None, *, indexed: bool = False) -> None:
        self._client = client
        self.indexed = indexed
        self.collection = collection
        self.dims = dims
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._ready = False
        self.sparse = False
        """Whether the collection has the BM25 sparse vector (known after `ensure_collection`): memq
        creates it so; a collection created before hybrid retrieval is searched by dense vectors only."""

    def ensure_collection(self) -> None:
        """Create the collection (cosine, `dims`) with keyword payload indexes on the scope ids, once.

        Raises:
            StoreError: the collection exists with another vector size.
            StoreUnavailable: Qdrant is unreachable.
        """
        if self._ready:
            return
        with self._lock, _mapped("create collection"):
            if not self._client.collection_exists(self.collection):
                self._client.create_collection(
                    self.collection, vectors_config=qm.VectorParams(size=self.dims, distance=qm.Distance.COSINE),
                    sparse_vectors_config={SPARSE_NAME: qm.SparseVectorParams(modifier=qm.Modifier.IDF)})
                if self.indexed:  # local mode ignores payload indexes (and warns)
                    for key in KEYWORD_INDEXES:
                        # user_id is the tenant key: Qdrant keeps each tenant's points together (its
                        # multitenancy guide), so one tenant's search reads little of the others'
                        schema = qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True) \
                            if key == "user_id" else qm.PayloadSchemaType.KEYWORD
                        self._client.create_payload_index(self.collection, key, schema)
                    self._client.create_payload_index(self.collection, "created_at", qm.PayloadSchemaType.DATETIME)
            info = self._client.get_collection(self.collection)
            if self.indexed and OCCURRED_TS not in (info.payload_schema or {}):
                # a collection created before temporal grounding gets the index of its time ranges
                self._client.create_payload_index(self.collection, OCCURRED_TS, qm.PayloadSchemaType.FLOAT)
            params = info.config.params.vectors
            size = params.size if isinstance(params, qm.VectorParams) else None
            if size != self.dims:
                raise StoreError(f"collection {self.collection!r} holds vectors of size {size}, "
                                 f"the embedder makes {self.dims}")
            self.sparse = SPARSE_NAME in (info.config.params.sparse_vectors or {})
            if not self.sparse:
                logger.warning("collection %r has no %r sparse vector (created before hybrid retrieval): searches "
                               "use dense vectors only; copy it into a new collection to get hybrid retrieval",
                               self.collection, SPARSE_NAME)
        self._ready = True

    def upsert(self, points: Sequence[MemoryPoint]) -> None:
        """Write points (insert or overwrite by id; idempotent)."""
        if not points:
            return
        self.ensure_collection()
        structs = [qm.PointStruct(id=p.id, vector=self._vectors(p), payload=p.payload()) for p in points]
        with self._lock, _mapped("upsert"):
            self._client.upsert(self.collection, points=structs, wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id (missing ids are ignored)."""
        if not ids:
            return
        self.ensure_collection()
        with self._lock, _mapped("delete"):
            self._client.delete(self.collection, points_selector=qm.PointIdsList(points=list(ids)), wait=True)

    def retrieve(self, ids: Sequence[str]) -> list[MemoryItem]:
        """Memories by id, in the order found (missing ids are skipped)."""
        if not ids:
            return []
        self.ensure_collection()
        with self._lock, _mapped("retrieve"):
            records = self._client.retrieve(self.collection, ids=list(ids), with_payload=True)
        return [to_item(r.id, r.payload) for r in records]

    def _vectors(self, point: MemoryPoint) -> dict[str, Any] | list[float]:
        if not self.sparse:
            return list(point.vector)
        indices, values = document_terms(point.memory)
        return {"": list(point.vector), SPARSE_NAME: qm.SparseVector(indices=indices, values=values)}

    def search_batch(self, vectors: Sequence[Sequence[float]], scope: Scope, *, limit: int,
                     threshold: float | None = None, filters: Mapping[str, Any] | None = None,
                     exact: bool = False, texts: Sequence[str] | None = None,
                     during: TimeRange | None = None) -> list[list[MemoryItem]]:
        """`search` for several vectors in one request; one list of hits per vector. With `texts` (and
        a collection with the sparse vector), each search fuses its dense and BM25 rankings.

        Args:
            exact: only memories whose scope equals `scope` (see `stores.vectors.select`).
            texts: one query text per vector (`stores.vectors.VectorStore.search`), or None.
        """
        if not vectors:
            return []
        self.ensure_collection()
        selection = select(scope, filters, exact=exact, unsupported=self.unsupported, during=during)
        flt = qdrant_filter(selection.pushed)

        def run(batch: Sequence[Probe], n: int) -> list[list[MemoryItem]]:
            planned = [self._request(p, n, flt, threshold) for p in batch]
            with self._lock, _mapped("query"):
                responses = self._client.query_batch_points(self.collection, requests=[r for r, _ in planned])
            return [fused_hits(p.vector, [(h.id, h.payload, dense_of(h.vector)) for h in r.points], threshold) if fused
                    else [to_item(h.id, h.payload, h.score) for h in r.points]
                    for p, (_, fused), r in zip(batch, planned, responses)]

        return searched(run, probes(vectors, texts), selection, limit)

    def _request(self, probe: Probe, n: int, flt: qm.Filter | None,
                 threshold: float | None) -> tuple[qm.QueryRequest, bool]:
        """A dense query, or dense and BM25 prefetches fused by RRF (with a text holding terms, on a
        collection with the sparse vector); and whether it is fused."""
        dense = [float(x) for x in probe.vector]
        indices, values = query_terms(probe.text) if probe.text is not None and self.sparse else ([], [])
        if not indices:
            return qm.QueryRequest(query=dense, filter=flt, limit=n, with_payload=True,
                                   score_threshold=threshold), False
        depth = fusion_depth(n)
        return qm.QueryRequest(
            query=qm.RrfQuery(rrf=qm.Rrf(k=RRF_K)), filter=flt, limit=n, with_payload=True, with_vector=[""],
            prefetch=[qm.Prefetch(query=dense, filter=flt, limit=depth, score_threshold=threshold),
                      qm.Prefetch(query=qm.SparseVector(indices=indices, values=values), using=SPARSE_NAME,
                                  filter=flt, limit=depth)]), True

    def count_of(self, node: Node | None) -> int:
        """How many points match `node` (at least 1)."""
        self.ensure_collection()
        with self._lock, _mapped("count"):
            return max(1, self._client.count(self.collection, count_filter=qdrant_filter(node), exact=True).count)

    def oldest(self, node: Node | None, n: int) -> builtins.list[MemoryItem]:
        """The `n` oldest points matching `node`, by ``created_at`` (order_by: the server's datetime
        index; local mode sorts in Python)."""
        self.ensure_collection()
        with self._lock, _mapped("scroll"):
            records, _ = self._client.scroll(self.collection, scroll_filter=qdrant_filter(node), with_payload=True,
                                             limit=max(1, n), order_by=qm.OrderBy(key="created_at"))
        return [to_item(r.id, r.payload) for r in records]

    def count(self, scope: Scope | None = None) -> int:
        """Number of points (of `scope`, or all)."""
        self.ensure_collection()
        with self._lock, _mapped("count"):
            return self._client.count(self.collection, count_filter=qdrant_filter(select(scope).pushed),
                                      exact=True).count

    def close(self) -> None:
        """Close the client (releases the local-mode folder)."""
        with self._lock:
            self._client.close()




def connect_server(settings: QdrantSettings, dims: int) -> QdrantClientStore:
    """A store on the Qdrant server at ``settings.url`` (no request is made yet).

    Raises:
        StoreUnavailable: on first use, when the server is unreachable.
    """
    assert settings.url is not None
    client = QdrantClient(url=settings.url, timeout=int(settings.timeout_s),
                          api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    return QdrantClientStore(client, settings.collection, dims, indexed=True)

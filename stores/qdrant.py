"""Qdrant vector store: memories as points, with Mem0's payload keys.

Payload of a point (the one place memory <-> payload is mapped): ``data`` (the memory text), ``hash``
(md5 of the text), ``created_at``/``updated_at`` (ISO-8601 UTC), the scope ids that are set
(``user_id``/``agent_id``/``run_id``), ``actor_id``, ``role``, ``source_message_ids`` and the caller's
metadata keys at the top level (as Mem0 stores them). A collection written by Mem0 reads as memq memories.

Modes: a Qdrant server (`qdrant.url`, production) or local mode on a folder (`qdrant.path`, embedded
default). Local mode allows one client per folder in one process, and concurrent calls corrupt it, so
`open_vector_store` keeps one client per folder per process and serializes every call with a lock.
In embedded mode the **worker process owns the store** (it writes `OWNER_FILE` there, so a process
refused the folder is told who holds it); a CLI search needs the worker stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from pydantic import JsonValue
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from memq.config import QdrantSettings
from memq.errors import InvalidRequest, StoreError, StoreUnavailable
from memq.models import MemoryItem, Scope

SCOPE_KEYS = ("user_id", "agent_id", "run_id")
CORE_KEYS = frozenset({"data", "hash", "created_at", "updated_at", *SCOPE_KEYS, "actor_id", "role",
                       "source_message_ids", "job_id"})


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

    def payload(self) -> dict[str, Any]:
        """The Qdrant payload for this memory (Mem0 keys)."""
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
    )


def scope_filter(scope: Scope, filters: Mapping[str, Any] | None = None, *, exact: bool = False) -> qm.Filter:
    """A filter on the scope ids, plus optional metadata equality filters.

    Args:
        scope: every id that is set must match (Mem0's read semantics).
        filters: ``{key: value}`` (equality) or ``{key: [v1, v2]}`` (any of); keys memq owns are refused.
        exact: the ids that are not set must be absent too, so only memories whose scope equals
            `scope` match (what a job decides over and writes to).

    Raises:
        InvalidRequest: a filter key is one memq owns (``user_id``, ``data``, ...) or a value is not scalar.
    """
    must: list[qm.Condition] = [qm.FieldCondition(key=k, match=qm.MatchValue(value=v))
                                for k, v in scope.as_filter().items()]
    if exact:
        must += [qm.IsEmptyCondition(is_empty=qm.PayloadField(key=k)) for k in SCOPE_KEYS
                 if getattr(scope, k) is None]
    for key, value in (filters or {}).items():
        if key in CORE_KEYS:
            raise InvalidRequest(f"filter key {key!r} is reserved; pass the scope as user_id/agent_id/run_id",
                                 field="filters")
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            must.append(qm.FieldCondition(key=key, match=qm.MatchAny(any=value)))
        elif isinstance(value, (str, int, bool)):
            must.append(qm.FieldCondition(key=key, match=qm.MatchValue(value=value)))
        else:
            raise InvalidRequest(f"filter {key!r} must be a string, int, bool or a list of them", field="filters")
    return qm.Filter(must=must)


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


class VectorStore:
    """Memories in one Qdrant collection.

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
                    self.collection, vectors_config=qm.VectorParams(size=self.dims, distance=qm.Distance.COSINE))
                if self.indexed:  # local mode ignores payload indexes (and warns)
                    for key in (*SCOPE_KEYS, "actor_id"):
                        self._client.create_payload_index(self.collection, key, qm.PayloadSchemaType.KEYWORD)
            info = self._client.get_collection(self.collection)
            params = info.config.params.vectors
            size = params.size if isinstance(params, qm.VectorParams) else None
            if size != self.dims:
                raise StoreError(f"collection {self.collection!r} holds vectors of size {size}, "
                                 f"the embedder makes {self.dims}")
        self._ready = True

    def upsert(self, points: Sequence[MemoryPoint]) -> None:
        """Write points (insert or overwrite by id; idempotent)."""
        if not points:
            return
        self.ensure_collection()
        structs = [qm.PointStruct(id=p.id, vector=list(p.vector), payload=p.payload()) for p in points]
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

    def search(self, vector: Sequence[float], scope: Scope, *, limit: int, threshold: float | None = None,
               filters: Mapping[str, Any] | None = None) -> list[MemoryItem]:
        """The `limit` memories of `scope` nearest to `vector`, best first, each with its cosine `score`."""
        return self.search_batch([vector], scope, limit=limit, threshold=threshold, filters=filters)[0]

    def search_batch(self, vectors: Sequence[Sequence[float]], scope: Scope, *, limit: int,
                     threshold: float | None = None, filters: Mapping[str, Any] | None = None,
                     exact: bool = False) -> list[list[MemoryItem]]:
        """`search` for several vectors in one request; one list of hits per vector.

        Args:
            exact: only memories whose scope equals `scope` (see `scope_filter`).
        """
        if not vectors:
            return []
        self.ensure_collection()
        flt = scope_filter(scope, filters, exact=exact)
        requests = [qm.QueryRequest(query=list(v), filter=flt, limit=limit, with_payload=True,
                                    score_threshold=threshold) for v in vectors]
        with self._lock, _mapped("query"):
            responses = self._client.query_batch_points(self.collection, requests=requests)
        return [[to_item(p.id, p.payload, p.score) for p in r.points] for r in responses]

    def list(self, scope: Scope, *, limit: int = 100, filters: Mapping[str, Any] | None = None) -> list[MemoryItem]:
        """Up to `limit` memories of `scope` (no ranking), oldest first by ``created_at``."""
        self.ensure_collection()
        items: list[MemoryItem] = []
        offset: Any = None
        flt = scope_filter(scope, filters)
        while len(items) < limit:
            with self._lock, _mapped("scroll"):
                records, offset = self._client.scroll(self.collection, scroll_filter=flt, with_payload=True,
                                                      limit=min(256, limit - len(items)), offset=offset)
            items += [to_item(r.id, r.payload) for r in records]
            if offset is None:
                break
        return sorted(items, key=lambda m: (m.created_at is None, m.created_at, m.id))

    def count(self, scope: Scope | None = None) -> int:
        """Number of points (of `scope`, or all)."""
        self.ensure_collection()
        with self._lock, _mapped("count"):
            return self._client.count(self.collection, count_filter=scope_filter(scope) if scope else None,
                                      exact=True).count

    def close(self) -> None:
        """Close the client (releases the local-mode folder)."""
        with self._lock:
            self._client.close()


_stores: dict[tuple[str, str], VectorStore] = {}
_stores_lock = threading.Lock()

OWNER_FILE = "memq-owner.json"
"""Written in an embedded Qdrant folder by the process that opened it: pid, host, command, time."""


def _record_owner(folder: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder / OWNER_FILE).write_text(json.dumps(info))


def _owner_of(folder: Path) -> str:
    try:
        info = json.loads((folder / OWNER_FILE).read_text())
        return f"process {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _held(folder: Path, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"the embedded Qdrant folder {folder} is owned by {_owner_of(folder)}: local mode allows one process "
        "per folder (in embedded mode the worker owns it). Stop that process, use another MEMQ_DATA_DIR, or "
        "run a Qdrant server (MEMQ_QDRANT__URL)")


def probe_local_folder(folder: Path) -> None:
    """Check that no other process owns an embedded Qdrant folder (open it and let it go at once).

    Raises:
        StoreUnavailable: another process owns it (the message names the folder and that process).
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        QdrantClient(path=str(folder)).close()
    except RuntimeError as exc:
        raise _held(folder, exc) from None


def open_vector_store(settings: QdrantSettings, dims: int) -> VectorStore:
    """The process-wide `VectorStore` for these settings (one client per folder or URL).

    Raises:
        StoreUnavailable: local mode and another process holds the folder (in embedded mode the
            worker owns it: stop the worker, or run a Qdrant server and set ``MEMQ_QDRANT__URL``).
    """
    target = settings.url or str(settings.path)
    key = (target, settings.collection)
    with _stores_lock:
        store = _stores.get(key)
        if store is not None:
            return store
        if settings.url:
            client = QdrantClient(url=settings.url, timeout=int(settings.timeout_s),
                                  api_key=settings.api_key.get_secret_value() if settings.api_key else None)
            store = VectorStore(client, settings.collection, dims, indexed=True)
        else:
            assert settings.path is not None
            same_folder = next((s for (t, _), s in _stores.items() if t == target), None)
            if same_folder is not None:
                client, lock = same_folder._client, same_folder._lock
            else:
                settings.path.mkdir(parents=True, exist_ok=True)
                try:
                    client = QdrantClient(path=str(settings.path))
                except RuntimeError as exc:
                    raise _held(settings.path, exc) from None
                _record_owner(settings.path)
                lock = threading.RLock()
            store = VectorStore(client, settings.collection, dims, lock=lock)  # type: ignore[arg-type]
        _stores[key] = store
        return store


def close_vector_store(store: VectorStore) -> None:
    """Close one store `open_vector_store` made and forget it (other stores of the process stay open).

    Stores sharing its client (same local folder, other collection) are forgotten too.
    """
    with _stores_lock:
        for key in [k for k, s in _stores.items() if s._client is store._client]:
            del _stores[key]
        store.close()


def close_vector_stores() -> None:
    """Close every client `open_vector_store` made in this process (tests, shutdown)."""
    with _stores_lock:
        seen: set[int] = set()
        for store in _stores.values():
            if id(store._client) not in seen:
                seen.add(id(store._client))
                store.close()
        _stores.clear()

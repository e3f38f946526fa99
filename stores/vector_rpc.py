"""Reads (and deletes) of the embedded vector store from a process that does not own it, over Redis.

The owner (the worker, in embedded mode) runs a `VectorServer`: one thread with its own Redis
connection that pops requests from ``memq:vectors:<store>:requests`` and pushes each answer to the
request's own reply list. It never waits behind model calls: those run in task threads, and the store's
calls take well under a millisecond. It also keeps ``memq:vectors:<store>:owner`` alive (a key with a
5 s expiry, refreshed every second) so a reader learns at once that no owner runs.

A `RemoteVectorStore` is the reader's side: the same `VectorStore` interface, each call one pipelined
push and one blocking pop (two round trips). ``<store>`` is a hash of the folder's resolved path and
the collection, so every process that configures the same folder finds the same owner.

Wire format: JSON. A request is ``{"op", "args", "reply", "deadline"}`` (deadline in ms since the epoch;
the owner drops a request it pops later); an answer is ``{"result": ...}`` or ``{"error": <memq error
class name>, "message", "field"}``, rebuilt as the same class on the reader's side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from memq import errors
from memq.errors import InvalidRequest, MemqError, NoStoreOwner, StoreError, StoreUnavailable
from memq.models import MemoryItem, Scope
from stores.occurred import TimeRange
from stores.vectors import MemoryPoint, VectorStore

__all__ = ["VectorServer", "RemoteVectorStore", "store_key", "owner_alive"]

logger = logging.getLogger(__name__)

HEARTBEAT_TTL_MS = 5000
"""The owner key expires this long after the owner's last heartbeat (ms)."""
POP_TIMEOUT_S = 1.0
"""The server's blocking pop returns at least this often (s), to beat the heartbeat and see a stop."""


def store_key(folder: Path, collection: str) -> str:
    """The Redis key prefix of the embedded store in `folder` (``memq:vectors:<16 hex digits>``)."""
    digest = hashlib.sha256(f"{folder.resolve()}\0{collection}".encode()).hexdigest()[:16]
    return f"memq:vectors:{digest}"


def owner_alive(client: redis.Redis, key: str) -> bool:
    """True when an owner's heartbeat for the store at `key` is current.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    return bool(client.exists(f"{key}:owner"))


def _scope(raw: Mapping[str, Any] | None) -> Scope | None:
    return Scope(**raw) if raw is not None else None


def _point(raw: Mapping[str, Any]) -> MemoryPoint:
    return MemoryPoint(
        id=raw["id"], vector=raw["vector"], memory=raw["memory"], scope=Scope(**raw["scope"]),
        created_at=datetime.fromisoformat(raw["created_at"]),
        updated_at=datetime.fromisoformat(raw["updated_at"]) if raw["updated_at"] else None,
        metadata=raw["metadata"], actor_id=raw["actor_id"], role=raw["role"],
        source_message_ids=raw["source_message_ids"], job_id=raw["job_id"],
        occurred_at=datetime.fromisoformat(raw["occurred_at"]) if raw.get("occurred_at") else None)


def _point_json(p: MemoryPoint) -> dict[str, Any]:
    return {"id": p.id, "vector": [float(x) for x in p.vector], "memory": p.memory,
            "scope": p.scope.model_dump(), "created_at": p.created_at.isoformat(),
            "updated_at": p.updated_at.isoformat() if p.updated_at else None, "metadata": dict(p.metadata),
            "actor_id": p.actor_id, "role": p.role, "source_message_ids": list(p.source_message_ids),
            "job_id": p.job_id, "occurred_at": p.occurred_at.isoformat() if p.occurred_at else None}


def _items(items: Sequence[MemoryItem]) -> list[dict[str, Any]]:
    return [i.model_dump(mode="json") for i in items]


class VectorServer:
    """Serves a store's operations to other processes over Redis, from one daemon thread.

    Args:
        store: the store this process owns.
        redis_url: the Redis to serve on (the broker's).
        key: the store's key prefix (`store_key`).
    """

    def __init__(self, store: VectorStore, redis_url: str, key: str) -> None:
        self.store = store
        self.key = key
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=POP_TIMEOUT_S + 5, socket_connect_timeout=5)
        self._stop = threading.Event()
        self._owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        self._ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": lambda a: "pong",
            "search_batch": lambda a: [_items(hits) for hits in store.search_batch(
                a["vectors"], Scope(**a["scope"]), limit=a["limit"], threshold=a["threshold"],
                filters=a["filters"], exact=a["exact"], texts=a.get("texts"),
                during=TimeRange.from_json(a.get("during")))],
            "retrieve": lambda a: _items(store.retrieve(a["ids"])),
            "list": lambda a: _items(store.list(Scope(**a["scope"]), limit=a["limit"], filters=a["filters"],
                                                offset=a.get("offset", 0), exact=a.get("exact", False))),
            "count": lambda a: store.count(_scope(a["scope"])),
            "delete": lambda a: store.delete(a["ids"]),
            "upsert": lambda a: store.upsert([_point(p) for p in a["points"]]),
        }
        self._thread = threading.Thread(target=self._run, name="memq-vector-server", daemon=True)

    def start(self) -> None:
        """Announce the owner and start serving (returns at once)."""
        try:
            self._beat()
        except redis.RedisError:
            logger.warning("Redis unreachable: reads from other processes wait until it is back")
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and withdraw the owner key (waits for the thread, at most ~`POP_TIMEOUT_S`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(POP_TIMEOUT_S + 5)
        try:
            self._redis.delete(f"{self.key}:owner")
        except redis.RedisError:
            pass
        self._redis.close()

    def _beat(self) -> None:
        self._redis.set(f"{self.key}:owner", self._owner, px=HEARTBEAT_TTL_MS)

    def _run(self) -> None:
        down = False
        while not self._stop.is_set():
            try:
                self._beat()
                popped = self._redis.blpop([f"{self.key}:requests"], timeout=POP_TIMEOUT_S)
                if down:
                    logger.info("vector server: Redis is back")
                    down = False
                if popped is not None:
                    self._serve(popped[1])
            except redis.RedisError as exc:
                if not down:
                    logger.warning("vector server: Redis unreachable (%s); retrying", type(exc).__name__)
                    down = True
                self._stop.wait(0.5)

    def _serve(self, raw: bytes | str) -> None:
        try:
            request = json.loads(raw)
            reply, op, args, deadline = request["reply"], request["op"], request["args"], request["deadline"]
        except (ValueError, KeyError, TypeError):
            logger.warning("vector server: dropped a malformed request")
            return
        if time.time() * 1000 > deadline:
            return  # its reader has given up
        try:
            answer: dict[str, Any] = {"result": self._ops[op](args)}
        except MemqError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc), "field": getattr(exc, "field", None)}
        except Exception as exc:  # a bad request must not end the server; its reader gets a StoreError
            logger.warning("vector server: %s failed with %s", op, type(exc).__name__)
            answer = {"error": "StoreError", "message": f"the vector store's owner failed: {type(exc).__name__}"}
        pipe = self._redis.pipeline(transaction=False)
        pipe.rpush(reply, json.dumps(answer))
        pipe.pexpire(reply, 30_000)
        pipe.execute()


class RemoteVectorStore(VectorStore):
    """The embedded store read through its owner (`VectorServer`), for processes that do not own it.

    Args:
        redis_url: the Redis the owner serves on.
        key: the store's key prefix (`store_key`).
        folder: the store's folder (for messages).
        collection, dims: the collection and its vector size.
        timeout_s: how long one call waits for the owner's answer (s).
    """

    def __init__(self, redis_url: str, key: str, folder: Path, collection: str, dims: int,
                 timeout_s: float = 10.0) -> None:
        self.key = key
        self.folder = folder
        self.collection = collection
        self.dims = dims
        self.timeout_s = timeout_s
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s + 5, socket_connect_timeout=5)

    def _call(self, op: str, **args: Any) -> Any:
        reply = f"{self.key}:reply:{uuid.uuid4().hex}"
        request = json.dumps({"op": op, "args": args, "reply": reply,
                              "deadline": int((time.time() + self.timeout_s) * 1000)})
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(f"{self.key}:owner")
            pipe.rpush(f"{self.key}:requests", request)
            pipe.pexpire(f"{self.key}:requests", int(self.timeout_s * 1000) + 5000)
            alive, _, _ = pipe.execute()
            deadline = time.monotonic() + self.timeout_s
            popped = None
            while alive and popped is None and time.monotonic() < deadline:
                popped = self._redis.blpop([reply], timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                if popped is None:
                    alive = owner_alive(self._redis, self.key)  # an owner that stopped or died stops the wait
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis unreachable asking the vector store's owner: {type(exc).__name__}") from None
        if not alive:
            raise NoStoreOwner(f"no process owns the embedded vector store {self.folder}: start a worker that "
                               "consumes memq.write (memq worker) to read through it, or stop using the folder "
                               "elsewhere")
        if popped is None:
            raise StoreUnavailable(f"the owner of the embedded vector store {self.folder} did not answer "
                                   f"within {self.timeout_s:g} s")
        answer = json.loads(popped[1])
        if "error" in answer:
            raise _rebuilt(answer)
        return answer["result"]

    def ensure_collection(self) -> None:
        """Check that an owner answers (the owner created the collection).

        Raises:
            NoStoreOwner: no process owns the store.
            StoreUnavailable: Redis is unreachable or the owner did not answer in time.
        """
        self._call("ping")

    def upsert(self, points: Sequence[MemoryPoint]) -> None:
        """Write points through the owner."""
        if points:
            self._call("upsert", points=[_point_json(p) for p in points])

    def delete(self, ids: Sequence[str]) -> None:
        """Delete points through the owner (missing ids are ignored)."""
        if ids:
            self._call("delete", ids=list(ids))

    def retrieve(self, ids: Sequence[str]) -> list[MemoryItem]:
        """Memories by id (missing ids are skipped)."""
        if not ids:
            return []
        return [MemoryItem.model_validate(i) for i in self._call("retrieve", ids=list(ids))]

    def search_batch(self, vectors: Sequence[Sequence[float]], scope: Scope, *, limit: int,
                     threshold: float | None = None, filters: Mapping[str, Any] | None = None,
                     exact: bool = False, texts: Sequence[str] | None = None,
                     during: TimeRange | None = None) -> list[list[MemoryItem]]:
        """`search` for several vectors (with `texts`: hybrid; with `during`: a time range), answered by
        the owner in one batch."""
        if not vectors:
            return []
        answer = self._call("search_batch", vectors=[[float(x) for x in v] for v in vectors],
                            scope=scope.model_dump(), limit=limit, threshold=threshold,
                            filters=dict(filters) if filters else None, exact=exact,
                            texts=list(texts) if texts is not None else None,
                            during=during.as_json() if during is not None else None)
        return [[MemoryItem.model_validate(i) for i in hits] for hits in answer]

    def list(self, scope: Scope, *, limit: int = 100, filters: Mapping[str, Any] | None = None,
             offset: int = 0, exact: bool = False) -> list[MemoryItem]:
        """A page of the memories of `scope`, oldest first (`VectorStore.list`), read by the owner."""
        answer = self._call("list", scope=scope.model_dump(), limit=limit, filters=dict(filters) if filters else None,
                            offset=offset, exact=exact)
        return [MemoryItem.model_validate(i) for i in answer]

    def count(self, scope: Scope | None = None) -> int:
        """Number of points (of `scope`, or all)."""
        return int(self._call("count", scope=scope.model_dump() if scope is not None else None))

    def close(self) -> None:
        """Close this reader's Redis connection (the owner keeps the store)."""
        self._redis.close()


def _rebuilt(answer: Mapping[str, Any]) -> MemqError:
    """The owner's error as the same memq error class (`StoreError` for anything unknown)."""
    cls = getattr(errors, str(answer.get("error")), None)
    message = str(answer.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, InvalidRequest):
        return cls(message, field=answer.get("field"))
    if isinstance(cls, type) and issubclass(cls, (StoreError, StoreUnavailable)):
        return cls(message)
    return StoreError(message)

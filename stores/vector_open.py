"""Which vector store a process gets: a Qdrant server, the embedded store it owns, or its owner's.

- ``qdrant.url`` set: every process talks to the Qdrant server (`stores.qdrant`).
- Embedded (no URL), role ``"owner"`` (the worker): this process opens the Edge folder and owns it
  (`stores.edge.open_edge`; refused with `StoreOwned` when another process does) and, given a Redis
  URL, serves other processes' reads from it (`stores.vector_rpc.VectorServer`).
- Embedded, role ``"reader"`` (`memories.Memories`, ``memq search``, a worker that does not consume
  ``memq.write``, `workers.app.store_role`): the store this process owns if
  it owns one, else the owner's through Redis (`stores.vector_rpc.RemoteVectorStore`). With
  ``own_if_free`` a reader that finds no owner opens the folder itself (a short-lived CLI command).

One store per folder (or URL) and collection per process; `close_vector_store` releases one.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal

from memq.config import QdrantSettings
from memq.errors import StoreUnavailable
from stores.vectors import VectorStore

if TYPE_CHECKING:
    from stores.vector_rpc import VectorServer

__all__ = ["open_vector_store", "close_vector_store", "close_vector_stores", "probe_embedded_folder",
           "owner_running"]

logger = logging.getLogger(__name__)

_stores: dict[tuple[str, str], VectorStore] = {}
_servers: dict[int, VectorServer] = {}
_lock = threading.Lock()


def _target(settings: QdrantSettings) -> str:
    if settings.url:
        return settings.url
    assert settings.path is not None, "settings.path is set by Settings when no URL is"
    return str(settings.path.resolve())


def open_vector_store(settings: QdrantSettings, dims: int, *, role: Literal["owner", "reader"] = "owner",
                      redis_url: str | None = None, own_if_free: bool = False) -> VectorStore:
    """The process's vector store for `settings`.

    Args:
        settings: the vector store settings (``url`` for a server, else the embedded ``path``).
        dims: vector size (the embedder's dimensions).
        role: ``"owner"`` opens the embedded folder; ``"reader"`` uses the owner's (see the module).
        redis_url: the Redis through which an owner serves and a reader asks (embedded mode).
        own_if_free: a reader that finds no live owner opens the folder itself.

    Returns:
        A `VectorStore`.

    Raises:
        StoreOwned: role ``"owner"`` and another process owns the folder (the message names both).
        StoreNeedsMigration: the folder holds a store of an older memq (``memq migrate-store``).
        StoreError: the store holds vectors of another size.
        StoreUnavailable: a reader with no `redis_url` and no store of its own.
    """
    key = (_target(settings), settings.collection)
    with _lock:
        store = _stores.get(key)
        if store is not None:
            return store
        if settings.url:
            from stores.qdrant import connect_server

            store = connect_server(settings, dims)
        elif role == "reader" and not (own_if_free and not owner_running(settings, redis_url)):
            if redis_url is None:
                raise StoreUnavailable("this process does not own the embedded vector store and has no Redis "
                                       "to ask its owner through")
            from stores.vector_rpc import RemoteVectorStore, store_key

            assert settings.path is not None
            return RemoteVectorStore(redis_url, store_key(settings.path, settings.collection), settings.path,
                                     settings.collection, dims, timeout_s=settings.timeout_s)
        else:
            store = _open_owned(settings, dims, redis_url if role == "owner" else None)
        _stores[key] = store
        return store


def owner_running(settings: QdrantSettings, redis_url: str | None) -> bool:
    """Whether a live process owns the embedded store of `settings` and serves reads through `redis_url`
    (False with no Redis, or a Redis that is down: nobody can be serving through it)."""
    if redis_url is None:
        return False
    import redis

    from stores.vector_rpc import owner_alive, store_key

    assert settings.path is not None
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return owner_alive(client, store_key(settings.path, settings.collection))
    except redis.RedisError:
        return False  # nobody can be serving through a Redis that is down
    finally:
        client.close()


def _open_owned(settings: QdrantSettings, dims: int, serve_on: str | None) -> VectorStore:
    from stores.edge import open_edge

    assert settings.path is not None
    store = open_edge(settings.path, settings.collection, dims)
    if serve_on is not None:
        from stores.vector_rpc import VectorServer, store_key

        server = VectorServer(store, serve_on, store_key(settings.path, settings.collection))
        server.start()
        _servers[id(store)] = server
    return store


def probe_embedded_folder(settings: QdrantSettings, dims: int) -> None:
    """Check that this process could own the embedded folder (open it and let it go at once).

    Raises:
        StoreOwned: another process owns it (the message names the folder and that process).
        StoreNeedsMigration: the folder holds a store of an older memq.
    """
    from stores.edge import open_edge

    assert settings.path is not None
    open_edge(settings.path, settings.collection, dims).close()


def _release(store: VectorStore) -> None:
    server = _servers.pop(id(store), None)
    if server is not None:
        server.stop()
    store.close()


def close_vector_store(store: VectorStore) -> None:
    """Close one store `open_vector_store` made and forget it (the process's other stores stay open)."""
    with _lock:
        for key in [k for k, s in _stores.items() if s is store]:
            del _stores[key]
        _release(store)


def close_vector_stores() -> None:
    """Close every store `open_vector_store` made in this process (tests, shutdown)."""
    with _lock:
        for store in list(_stores.values()):
            _release(store)
        _stores.clear()

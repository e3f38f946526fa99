"""The clients a worker or a read helper needs, built once per process as a small frozen bundle."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from broker.jobstore import JobStore
from broker.ratelimit import RateLimiter
from jobs.ledger import JobLedger
from memq.config import Settings
from pipeline.caption import Fetch
from pipeline.llm import LLM
from stores.caption_cache import CaptionCache
from stores.embed_cache import cached
from stores.embedder import Embedder, get_embedder
from stores.graph import GraphStore, open_graph_store
from stores.history import HistoryStore, open_history_store, sql_engine
from stores.vector_open import open_vector_store
from stores.vectors import VectorStore
from stores.records import RecordStore


@dataclass(frozen=True)
class Clients:
    """Everything an add job's stages and the read helpers may use.

    Attributes:
        settings: the process's settings.
        embedder: the embedder (model loaded once per process; a hosted one has its budget in the
            shared rate limiter, ``embed:<model>``), behind the process's cache of recent texts' vectors
            (``embedder.cache_texts``, `stores.embed_cache`).
        vectors: the vector store (in embedded mode, role ``"owner"``: this process owns it and serves
            other processes' reads from it; role ``"reader"``: the owner's, read through Redis).
        history: the SQL history store.
        llm: the model behind extraction and decisions.
        ledger: job records in Redis and SQL (rides out a Redis restart of up to
            ``jobs.broker_outage_s`` seconds).
        graph: the Neo4j graph store, or None when graph memory is off (no ``MEMQ_NEO4J__URI``).
        vision: the caption stage's vision model, or None (``MEMQ_VISION__MODEL`` unset: supplied
            captions only).
        captions: the shared caption cache (Redis).
        fetch: downloads http(s) images for the vision model (``MEMQ_VISION__FETCH``), or None.
    """

    settings: Settings
    embedder: Embedder
    vectors: VectorStore
    history: HistoryStore
    llm: LLM
    ledger: JobLedger
    graph: GraphStore | None = None
    vision: LLM | None = None
    captions: CaptionCache | None = None
    fetch: Fetch | None = None

    @property
    def records(self) -> RecordStore:
        """Durable job records and dead letters (SQL)."""
        return self.ledger.records


_clients: dict[tuple[Settings, str], Clients] = {}
_lock = threading.Lock()


def build_clients(settings: Settings, *, role: Literal["owner", "reader"] = "owner") -> Clients:
    """The process-wide `Clients` for `settings` and `role` (built on first call).

    Args:
        settings: memq settings.
        role: how an embedded vector store (and the entity-name collection beside it) is opened
            (`stores.vector_open.open_vector_store`): ``"owner"`` opens the folder (a worker that writes
            memories); ``"reader"`` reads through the owner over Redis (a worker of the model stages
            only, `workers.app.store_role`), so it never holds the folder. Same clients either way
            with a Qdrant server.

    Raises:
        StoreOwned: role ``"owner"`` and another process owns the embedded vector store's folder.
        StoreNeedsMigration: that folder holds an older memq's store (``memq migrate-store``).
        StoreUnavailable: a store is unreachable.
        StoreError: the collection's vector size differs from the embedder's.
    """
    with _lock:
        clients = _clients.get((settings, role))
        if clients is None:
            assert settings.history.url is not None
            jobs = JobStore.from_url(settings.redis.url, ttl_s=settings.jobs.ttl_s,
                                     socket_timeout_s=settings.redis.socket_timeout_s,
                                     outage_s=settings.jobs.broker_outage_s)
            history = open_history_store(settings.history.url)
            limiter = RateLimiter(jobs.client)
            embedder = cached(get_embedder(settings.embedder, limiter=limiter), settings.embedder.cache_texts)
            vision_llm = settings.vision.llm_settings()
            fetch: Fetch | None = None
            if settings.vision.fetch:
                from stores.image_fetch import ImageFetcher

                fetch = ImageFetcher(settings.vision).fetch
            clients = Clients(
                settings=settings,
                embedder=embedder,
                vectors=open_vector_store(settings.qdrant, embedder.dims, role=role,
                                          redis_url=settings.redis.url),
                history=history,
                llm=LLM(settings.llm, embedder=embedder, limiter=limiter),
                ledger=JobLedger(jobs, RecordStore(sql_engine(settings.history.url)), history),
                graph=open_graph_store(settings, role=role),
                vision=LLM(vision_llm, limiter=limiter, budget=f"vision:{vision_llm.model}") if vision_llm else None,
                captions=CaptionCache(jobs.client, ttl_s=settings.vision.cache_ttl_s,
                                      outage_s=settings.jobs.broker_outage_s),
                fetch=fetch,
            )
            _clients[(settings, role)] = clients
        return clients

"""The Celery app of memq workers: configured from `celeryconfig`, stores opened before consuming.

`OwnStores` is a worker boot step that runs before the consumer starts: it opens every store the
worker will use (thread and solo pools; a prefork parent that will own the embedded Qdrant folder
checks that it is free, its children open it). A worker that cannot, for instance because another
process owns the embedded Qdrant folder, stops with an error before it takes any task: nothing else
may take a job it cannot finish.

In embedded mode the worker that consumes ``memq.write`` owns the Qdrant Edge folder; a worker of the
other queues only (``memq worker --queues memq.llm``) reads it through that owner over Redis
(`store_role`), so model stages scale out over more processes (and prefork children) beside the one
owner.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from celery import Celery, bootsteps
from celery._state import _set_task_join_will_block
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from jobs.clients import Clients, build_clients
from memq.config import Queues, Settings, load_settings
from memq.errors import StoreUnavailable

logger = logging.getLogger(__name__)

app = Celery("memq", include=["workers.tasks"])
app.config_from_object("celeryconfig")


_role: Literal["owner", "reader"] | None = None


def store_role() -> Literal["owner", "reader"]:
    """How this worker opens an embedded vector store: ``"owner"`` when it consumes ``memq.write`` (the
    queue of the stages that write memories and entity names), else ``"reader"``: its stages (start,
    caption, extract, decide) read the store through the owner (`stores.vector_rpc`; the only write a
    reader may send it is the one-off move of name embeddings an older memq kept in Neo4j,
    `stores.graph.GraphStore.ensure_schema`). Decided once per process, from the queues the worker was
    started with (``-Q``, all of them by default; in a process that runs no worker: all of them, so
    ``"owner"``): a queue added or cancelled later at run time (Flower, ``celery control``) does not
    change it. Prefork children forked from the worker inherit its ``-Q`` selection (Linux's default
    start method; children started by spawn would see every queue and take the owner's role).

    Returns:
        ``"owner"`` or ``"reader"``.
    """
    global _role
    if _role is None:
        _role = "owner" if Queues.WRITE in consumed_queues() else "reader"
    return _role


def consumed_queues() -> set[str]:
    """The names of the queues this process's worker consumes (``-Q``; all of memq's by default)."""
    return set(app.amqp.queues.consume_from) or set(Queues.ALL)


def clients() -> Clients:
    """This process's clients (built on first use from the environment's settings, in this worker's
    `store_role`)."""
    return build_clients(load_settings(), role=store_role())


def _open_stores() -> Clients:
    """Build the clients and create the graph schema (idempotent); the graph store being unreachable
    (Neo4j, or the embedded store's owner for a reader's entity names) only delays it."""
    c = clients()
    if c.graph is not None:
        try:
            c.graph.ensure_schema()
        except StoreUnavailable as exc:
            logger.warning("graph store unreachable at start-up (%s); its schema is created on first use",
                           type(exc).__name__)
    return c


class OwnStores(bootsteps.StartStopStep):  # type: ignore[misc]
    """Open the stores before the consumer starts; raise (the worker exits 1) if they cannot be opened.

    Tasks never wait on results, so the process does not subscribe to result channels either.
    """

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        """Open the stores (or, for a prefork parent, check the embedded folder is free when the worker
        will own it; a reader worker only says whether an owner runs).

        Raises:
            StoreOwned: this worker would own the embedded vector store's folder and another process does.
            StoreNeedsMigration: that folder holds an older memq's store.
            StoreUnavailable: a store cannot be opened.
        """
        _set_task_join_will_block(True)
        serve_metrics()
        start_rescue()
        pool = str(getattr(worker, "pool_cls", "") or app.conf.worker_pool or "")
        settings = load_settings()
        if settings.embedded_qdrant and store_role() == "reader":
            _announce_reader(settings)
        if "prefork" in pool.lower():
            if settings.embedded_qdrant and store_role() == "owner":
                from stores.vector_open import probe_embedded_folder

                probe_embedded_folder(settings.qdrant, settings.embedder.dims)
            return
        _open_stores()

    def stop(self, worker: Any) -> None:
        """Stop this worker's rescue sweep (`start_rescue`)."""
        global _rescue_stop
        if _rescue_stop is not None:
            _rescue_stop.set()
            _rescue_stop = None


app.steps["worker"].add(OwnStores)


def _announce_reader(settings: Settings) -> None:
    """Log that this worker reads the embedded store through its owner, and warn when none runs yet (its
    decide stages then wait for one, `jobs.add.OWNER_WAIT_S`)."""
    from stores.vector_open import owner_running

    if owner_running(settings.qdrant, settings.redis.url):
        logger.info("queues %s: reading the embedded vector store %s through its owner",
                    ",".join(sorted(consumed_queues())), settings.qdrant.path)
    else:
        logger.warning("queues %s: no worker owns the embedded vector store %s yet (start one that consumes "
                       "%s); decide stages wait for one", ",".join(sorted(consumed_queues())),
                       settings.qdrant.path, Queues.WRITE)


_metrics_started = False


def serve_metrics() -> None:
    """Serve this process's Prometheus metrics on ``MEMQ_METRICS__PORT`` (once per process), with the
    broker's backlog gauges. A port already taken (another worker on the host) is a warning, not an error:
    the worker still works."""
    global _metrics_started
    settings = load_settings()
    if _metrics_started or not settings.metrics.port:
        return
    from prometheus_client import REGISTRY, start_http_server

    from broker.queue_metrics import QueueCollector

    try:
        start_http_server(settings.metrics.port, addr=settings.metrics.host)
    except OSError as exc:
        logger.warning("metrics: port %s unavailable (%s); this worker serves no metrics",
                       settings.metrics.port, type(exc).__name__)
        return
    REGISTRY.register(QueueCollector(settings.redis.url))
    _metrics_started = True
    logger.info("metrics on http://%s:%s/metrics", settings.metrics.host, settings.metrics.port)


_rescue_stop: threading.Event | None = None


def start_rescue() -> None:
    """Start this worker's rescue sweep of lost jobs (`jobs.rescue`; once per process, in the main process).

    Its ledger is its own: Redis and an unpooled SQL engine outside the process-wide cache, so a prefork
    parent keeps no SQL connection that the children it forks later (a killed child's replacement) would
    inherit, and those children still build their own stores."""
    global _rescue_stop
    settings = load_settings()
    if _rescue_stop is not None or settings.jobs.rescue_every_s <= 0:
        return
    from jobs.ledger import JobLedger
    from jobs.rescue import start_sweeper

    _rescue_stop = start_sweeper(JobLedger.open(settings, pooled=False), every_s=settings.jobs.rescue_every_s, quiet_s=settings.jobs.rescue_after_s,
                                 most=settings.jobs.rescue_max,
                                 held_for_s=2.0 * settings.redis.visibility_timeout_s)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """With ``MEMQ_LOG__FORMAT=json``, every handler Celery set up writes `memq.logs.JsonFormatter` lines."""
    if load_settings().log.format != "json" or logger is None:
        return
    from memq.logs import JsonFormatter

    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


@worker_process_init.connect
def _open_in_child(**_: Any) -> None:
    """Prefork children build their own clients (never share clients across fork)."""
    _set_task_join_will_block(True)
    _open_stores()


@worker_shutdown.connect
@worker_process_shutdown.connect
def _release_stores(**_: Any) -> None:
    """At the end of the worker (or of a prefork child) flush and release the embedded vector store and
    withdraw its owner key, so readers learn at once that no owner runs."""
    from stores.vector_open import close_vector_stores

    close_vector_stores()

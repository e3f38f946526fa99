"""The Celery app of memq workers: configured from `celeryconfig`, clients built once per process."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery._state import _set_task_join_will_block
from celery.signals import worker_init, worker_process_init

from memq.config import load_settings
from memq.errors import StoreUnavailable
from pipeline.clients import Clients, build_clients

logger = logging.getLogger(__name__)

app = Celery("memq")
app.config_from_object("celeryconfig")


def clients() -> Clients:
    """This process's clients (built on first use from the environment's settings)."""
    return build_clients(load_settings())


def _start_up() -> None:
    """Build the clients and create the graph schema (idempotent); Neo4j being down only delays it."""
    c = clients()
    if c.graph is not None:
        try:
            c.graph.ensure_schema()
        except StoreUnavailable:
            logger.warning("Neo4j unreachable at start-up; its schema is created on first use")


@worker_init.connect
def _warm_main(sender: Any = None, **_: Any) -> None:
    """Thread and solo pools run tasks in the main process: load models before consuming. A prefork
    parent opens nothing (its children do: a local Qdrant folder must have one owner).

    Tasks never wait on results, so (as prefork children do) the process does not subscribe to
    result channels when a task starts a chain.
    """
    _set_task_join_will_block(True)
    pool = str(getattr(sender, "pool_cls", "") or app.conf.worker_pool or "")
    if "prefork" not in pool.lower():
        _start_up()


@worker_process_init.connect
def _warm_child(**_: Any) -> None:
    """Prefork children build their own clients (never share clients across fork)."""
    _start_up()


import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)

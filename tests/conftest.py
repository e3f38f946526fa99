"""Session fixtures that start real services: redis-server, an OpenAI-compatible LLM test server, and a
real Celery worker (thread pool, in this process) consuming from that Redis.

The worker's model is ``openai/test-model`` at the LLM test server, reached by litellm over HTTP; with
no scripted reply the server answers with memq's offline heuristic, so tests script only what they check.
Its vision model is ``openai/test-vision`` at the same server, which describes images by
`LLMTestServer.image_captions`.
A missing ``redis-server`` skips on a laptop and fails in CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from memq.config import Settings, load_settings
from tests.rigs.llm_server import LLMTestServer
from tests.rigs.neo4j_server import Neo4jServer
from cli.redis_server import RedisServer

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo10.json"
requires_locomo = pytest.mark.skipif(not LOCOMO.exists() and not os.environ.get("CI"),
                                     reason="shared/data/locomo10.json is not beside the repo (required in CI)")
"""Tests on LoCoMo skip on a laptop without the data and fail in CI."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        message = f"{binary} is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server process for the whole session (broker, results, job records)."""
    _need("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LLMTestServer]:
    """The scripted OpenAI-compatible server; unscripted calls get the offline heuristic's answer."""
    from pipeline.offline_model import answer

    with LLMTestServer(default=lambda prompt: json.dumps(answer(prompt))) as server:
        yield server


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neo4jServer | None]:
    """Neo4j 5.26 through the test harness (Java launcher) on a free port, with auth; None (graph off)
    where Java or Maven is missing on a laptop; required in CI."""
    if shutil.which("java") is None or shutil.which("mvn") is None:
        if os.environ.get("CI"):
            pytest.fail("java and mvn are needed for the Neo4j test server")
        yield None
        return
    with Neo4jServer(password="memq-test-password", data_dir=tmp_path_factory.mktemp("neo4j")) as server:
        yield server


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, llm_server: LLMTestServer, neo4j_server: Neo4jServer | None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of the session worker, exported as MEMQ_* so `celeryconfig` reads the same. Graph
    memory is on (Neo4j) whenever the Neo4j test server runs."""
    data_dir = tmp_path_factory.mktemp("memq-data")
    graph = {"MEMQ_NEO4J__URI": neo4j_server.uri, "MEMQ_NEO4J__PASSWORD": neo4j_server.password} if neo4j_server else {}
    env = {
        **graph,
        "MEMQ_DATA_DIR": str(data_dir),
        "MEMQ_REDIS__URL": redis_server.url,
        "MEMQ_LLM__MODEL": "openai/test-model",
        "MEMQ_LLM__API_BASE": llm_server.url,
        "MEMQ_LLM__API_KEY": "test-key",
        "MEMQ_LLM__TIMEOUT_S": "4",
        "MEMQ_VISION__MODEL": "openai/test-vision",
        "MEMQ_VISION__API_BASE": llm_server.url,
        "MEMQ_VISION__API_KEY": "test-key",
        "MEMQ_VISION__TIMEOUT_S": "4",
        "MEMQ_JOBS__RETRY_BACKOFF_MAX_S": "8",
        "MEMQ_METRICS__PORT": str(free_port()),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    load_settings.cache_clear()
    yield load_settings()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    load_settings.cache_clear()


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[Any]:
    """A real Celery worker (thread pool) in this process, consuming every memq queue."""
    from celery._state import _set_task_join_will_block
    from celery.contrib.testing.worker import start_worker

    from workers.app import app, clients

    assert app.conf.broker_url == settings.redis.url
    clients()
    _set_task_join_will_block(True)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=30) as w:
        yield w
    from stores.vector_open import close_vector_stores

    close_vector_stores()  # the worker has stopped: release the embedded folder before the interpreter exits


@pytest.fixture()
def producer(settings: Settings, worker: Any) -> Iterator[Any]:
    """A producer on the session Redis, with the session worker running."""
    from producer import Producer

    p = Producer(settings)
    yield p
    p.close()


@pytest.fixture()
def memories(settings: Settings, worker: Any) -> Any:
    """The synchronous reads and deletes, sharing the worker's stores (same process)."""
    from memories import Memories

    return Memories(settings)


@pytest.fixture()
def client(settings: Settings, worker: Any) -> Iterator[Any]:
    """`memq.Memory` on the session services, waiting for its jobs (as a ported Mem0 script does)."""
    from memories import Memory

    m = Memory(settings, wait=True, timeout=90.0)
    yield m
    m.close()


@pytest.fixture()
def graph(settings: Settings, worker: Any) -> Any:
    """The worker's graph store; skips the test where graph memory is off (no Neo4j on a laptop)."""
    from jobs.clients import build_clients

    store = build_clients(settings).graph
    if store is None:
        pytest.skip("Neo4j is not available")
    return store


@pytest.fixture()
def model(llm_server: LLMTestServer) -> Iterator[Callable[[Callable[[str], str]], None]]:
    """Swap the LLM test server's default answer (a function of the prompt) for one test."""
    saved = llm_server.default

    def use(default: Callable[[str], str]) -> None:
        llm_server.default = default

    yield use
    llm_server.default = saved


@pytest.fixture()
def user_id() -> str:
    """A fresh user scope per test."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _fresh_script(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with an empty LLM script (when it uses the LLM server)."""
    if "llm_server" in request.fixturenames:
        server: LLMTestServer = request.getfixturevalue("llm_server")
        server.reset()
    yield


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A throwaway PostgreSQL (`tests.rigs.postgres_server.PostgresServer`) for the session; a test takes
    its own empty database with ``postgres_server.create_database()`` (returns its SQLAlchemy URL). The
    server's TimeZone is Asia/Kolkata (+05:30), so a timestamp that loses its zone on the way shows.
    Skips on a laptop where PostgreSQL's binaries or the psycopg driver are missing; required in CI."""
    import importlib.util

    from tests.rigs.postgres_server import PostgresServer, postgres_bin_dir

    missing = [what for what, found in (("PostgreSQL (initdb, postgres)", postgres_bin_dir() is not None),
                                        ("psycopg", importlib.util.find_spec("psycopg") is not None)) if not found]
    if missing:
        message = f"{' and '.join(missing)} not installed (scripts/setup.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with PostgresServer(timezone="Asia/Kolkata") as server:
        yield server

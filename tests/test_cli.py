"""The command line: reads over an embedded store with no worker running (the CLI opens the folder
itself: get-all pages and filters), writes as jobs the session worker runs (add, update, delete,
delete-all), and backfill printing its job ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis

from cli.redis_server import RedisServer
from memq.models import Scope
from stores.edge import open_edge
from stores.vectors import MemoryPoint

WHEN = datetime(2024, 5, 1, tzinfo=timezone.utc)


@pytest.fixture()
def env(redis_server: RedisServer, tmp_path: Path) -> Iterator[dict[str, str]]:
    """MEMQ_* for a data folder holding 5 memories of ``cli-ann`` and one of ``cli-bob``, on a Redis
    database of its own (no worker owns the folder)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    store = open_edge(tmp_path / "data" / "qdrant", "memq", 384)
    vector = [1.0] + [0.0] * 383
    store.upsert([MemoryPoint(id=str(uuid.UUID(int=i + 1)), vector=vector, memory=f"Ann fact {i}",
                              scope=Scope(user_id="cli-ann") if i < 5 else Scope(user_id="cli-bob"),
                              created_at=WHEN + timedelta(days=i), updated_at=None, metadata={"n": i},
                              actor_id="Ann", role="user", source_message_ids=[str(i)], job_id="seed")
                  for i in range(6)])
    store.close()
    yield {**{k: v for k, v in os.environ.items() if not k.startswith("MEMQ_")},
           "MEMQ_DATA_DIR": str(tmp_path / "data"), "MEMQ_REDIS__URL": url, "HF_HUB_OFFLINE": "1"}
    redis.Redis.from_url(url).flushdb()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=120)


def test_get_all_pages_and_filters_from_the_command_line(env: dict[str, str]) -> None:
    page = _cli(env, "get-all", "--user-id", "cli-ann", "--limit", "2", "--offset", "2", "--json")
    assert page.returncode == 0, page.stderr[-2000:]
    assert [m["memory"] for m in json.loads(page.stdout)["results"]] == ["Ann fact 2", "Ann fact 3"]
    filtered = _cli(env, "get-all", "--user-id", "cli-ann", "--filters", '{"n": {"gte": 3}}', "--json")
    assert [m["memory"] for m in json.loads(filtered.stdout)["results"]] == ["Ann fact 3", "Ann fact 4"]
    table = _cli(env, "get-all", "--user-id", "cli-ann", "--limit", "1")
    assert table.returncode == 0 and "Ann fact 0" in table.stdout and "{" not in table.stdout
    bad = _cli(env, "get-all", "--user-id", "cli-ann", "--filters", '{"n": {"like": 1}}')
    assert bad.returncode == 1 and "InvalidFilter" in bad.stdout and "Traceback" not in bad.stderr
    not_json = _cli(env, "get-all", "--user-id", "cli-ann", "--filters", "n=1")
    assert not_json.returncode == 2 and "--filters is not JSON" in not_json.stdout

    first = str(uuid.UUID(int=1))
    no_worker = _cli(env, "delete", first, "--user-id", "cli-ann")  # writes are jobs: they need a worker
    assert no_worker.returncode == 1 and "NoStoreOwner" in no_worker.stdout and "Traceback" not in no_worker.stderr
    assert len(json.loads(_cli(env, "get-all", "--user-id", "cli-ann", "--json").stdout)["results"]) == 5


def test_writes_from_the_command_line_are_jobs_run_by_the_worker(worker: object, settings: object,
                                                                 user_id: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the session's MEMQ_* settings: its Redis and worker
    added = _cli(env, "add", "I like green tea.", "--user-id", user_id, "--no-infer", "--metadata",
                 '{"topic": "drinks"}', "--json")
    assert added.returncode == 0, added.stdout + added.stderr[-2000:]
    [event] = json.loads(added.stdout)["results"]
    assert event["event"] == "ADD" and event["memory"] == "I like green tea." and event["role"] == "user"
    table = _cli(env, "add", "I like black tea.", "--user-id", user_id, "--no-infer")
    assert table.returncode == 0 and "ADD" in table.stdout and "{" not in table.stdout

    other = _cli(env, "update", event["id"], "I like oolong.", "--user-id", user_id + "-x")
    assert other.returncode == 1 and "MemoryNotFound" in other.stdout
    changed = _cli(env, "update", event["id"], "I like oolong tea.", "--user-id", user_id, "--json")
    assert changed.returncode == 0 and json.loads(changed.stdout) == {"message": "Memory updated successfully!"}
    got = json.loads(_cli(env, "get", event["id"], "--user-id", user_id, "--json").stdout)
    assert got["memory"] == "I like oolong tea." and got["metadata"] == {"topic": "drinks"}

    queued = _cli(env, "delete", event["id"], "--user-id", user_id, "--no-wait", "--json")
    assert queued.returncode == 0 and uuid.UUID(json.loads(queued.stdout)["job_id"])
    refused = _cli(env, "delete-all", "--user-id", user_id)  # no --yes and no terminal: nothing deleted
    assert refused.returncode == 1
    everything = _cli(env, "delete-all", "--user-id", user_id, "--yes", "--json")
    assert everything.returncode == 0 and json.loads(everything.stdout) == {"message": "Memories deleted successfully!"}
    assert json.loads(_cli(env, "get-all", "--user-id", user_id, "--json").stdout)["results"] == []
    history = json.loads(_cli(env, "history", event["id"], "--user-id", user_id, "--json").stdout)
    shown = _cli(env, "history", event["id"], "--user-id", user_id)
    assert shown.returncode == 0 and "UPDATE" in shown.stdout and "oolong" in shown.stdout
    assert _cli(env, "get", event["id"], "--user-id", user_id).returncode == 1  # deleted: exit 1
    assert [h["event"] for h in history] == ["ADD", "UPDATE", "DELETE"]


def test_backfill_prints_each_job_id(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    log.write_text("\n".join(json.dumps({"conversation_id": "c1", "session_id": s, "user_id": "cli-carl",
                                         "messages": [{"role": "user", "content": f"I like tea {s}."}]})
                             for s in ("s1", "s2")) + "\n")
    out = _cli(env, "backfill", str(log), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["conversation"], r["session"], r["duplicate"]) for r in rows] == [("c1", "s1", False),
                                                                               ("c1", "s2", False)]
    assert all(uuid.UUID(r["job_id"]) for r in rows) and "2 enqueued" in out.stderr
    again = [json.loads(line) for line in _cli(env, "backfill", str(log), "--json").stdout.splitlines()]
    assert [(r["job_id"], r["duplicate"]) for r in again] == [(r["job_id"], True) for r in rows]

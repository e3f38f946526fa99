"""Backfill: readers for LoCoMo and JSONL, and the command line against a real worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.redis_server import RedisServer
from producer.backfill import BackfillFormatError, read_jsonl, read_locomo
from tests.conftest import LOCOMO, requires_locomo

pytestmark = requires_locomo


def test_locomo_sessions_become_adds_in_chronological_order() -> None:
    items = read_locomo(LOCOMO, conversations=["conv-26"])
    assert [i.session_id for i in items] == [f"session_{n}" for n in range(1, 20)]
    first = items[0].request
    assert first["user_id"] == "locomo-conv-26"
    assert first["timestamp"] == "2023-05-08T13:56:00+00:00"
    assert first["idempotency_key"] == "backfill:locomo10.json:conv-26:session_1"
    assert first["messages"][0] == {"role": "user", "name": "Caroline", "id": "D1:1",
                                    "content": "Hey Mel! Good to see you! How have you been?"}
    shared = next(m for m in first["messages"] if m["id"] == "D1:5")
    assert shared["content"] == [
        {"type": "text", "text": "The transgender stories were so inspiring! I was so happy and thankful for all "
                                 "the support."},
        {"type": "image_url", "image_url": {"url": "https://i.redd.it/l7hozpetnhlb1.jpg"},
         "caption": "a photo of a dog walking past a wall with a painting of a woman"}]
    assert sum(len(i.request["messages"]) for i in items) == 419


def test_an_unknown_conversation_is_a_clear_error() -> None:
    with pytest.raises(BackfillFormatError, match="conv-99"):
        read_locomo(LOCOMO, conversations=["conv-99"])


def test_jsonl_lines_become_adds_and_bad_lines_name_their_number(tmp_path: Path) -> None:
    good = tmp_path / "chats.jsonl"
    good.write_text(json.dumps({"conversation_id": "c1", "session_id": "s1", "user_id": "ann",
                                "timestamp": "2024-05-01T10:00:00Z", "messages": "I moved to Lyon."}) + "\n")
    [item] = read_jsonl(good)
    assert item.request["idempotency_key"] == "backfill:chats.jsonl:c1:s1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversation_id": "c1", "messages": "x", "user_id": "a"}) + "\n{oops\n")
    with pytest.raises(BackfillFormatError, match=r"bad.jsonl:2"):
        read_jsonl(bad)


@pytest.fixture()
def worker_process(tmp_path: Path, redis_server: RedisServer) -> Iterator[dict[str, str]]:
    """A `memq worker` process with the default (offline) model, on its own Redis database and data dir."""
    env = {**os.environ, "MEMQ_REDIS__URL": redis_server.url.rsplit("/", 1)[0] + "/5",
           "MEMQ_DATA_DIR": str(tmp_path / "data"), "MEMQ_LLM__MODEL": "memq-offline/heuristic-v1"}
    for key in ("MEMQ_LLM__API_BASE", "MEMQ_LLM__API_KEY"):
        env.pop(key, None)
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    yield env
    proc.terminate()
    proc.wait(60)
    log.close()


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_backfill_command_runs_every_session_and_a_rerun_enqueues_nothing(tmp_path: Path,
                                                                         worker_process: dict[str, str]) -> None:
    # Given the first three sessions of conv-26 as a JSONL chat log
    log = tmp_path / "conv26.jsonl"
    with log.open("w") as f:
        for item in read_locomo(LOCOMO, conversations=["conv-26"])[:3]:
            row = {"conversation_id": item.conversation_id, "session_id": item.session_id, **item.request}
            row.pop("idempotency_key")
            f.write(json.dumps(row) + "\n")
    cmd = [sys.executable, "-m", "cli", "backfill", str(log), "--wait", "--timeout", "240"]
    # When it is backfilled and followed to the end
    first = subprocess.run(cmd, env=worker_process, capture_output=True, text=True, timeout=300)
    # Then every job succeeded and events were counted
    assert first.returncode == 0, first.stdout + first.stderr
    assert "0 done before, 3 enqueued, 0 already" in first.stdout and "succeeded 3" in first.stdout
    assert "ADD" in first.stdout
    # When the same file is backfilled again, Then nothing is enqueued twice
    second = subprocess.run(cmd, env=worker_process, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 done before, 0 enqueued" in second.stdout

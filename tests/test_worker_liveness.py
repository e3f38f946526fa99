"""Worker liveness with real processes: a worker keeps consuming through Redis restarts (or exits
non-zero so that a supervisor restarts it), and malformed messages go to the poison list instead of
ending the worker. See `broker.transport` and `broker.consumer`."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer as KombuProducer, Queue

from broker.poison import POISON_KEY, poison_count, poison_messages
from cli.redis_server import RedisServer
from memq.config import RedisSettings, Settings
from memq.models import JobState
from producer import Producer
from tests.conftest import _need
from tests.rigs.llm_server import LLMTestServer, Reply
from tests.rigs.workers import start_worker, stop_worker, worker_env

REPO = Path(__file__).resolve().parents[1]
MARKER = "PRIVATE-" + uuid.uuid4().hex
"""Put inside every malformed message: the worker's log must never show it."""


# --- helpers ---------------------------------------------------------------------------------------

def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` every 50 ms until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


@pytest.fixture()
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test only, with AOF persistence (restarts keep its data)."""
    _need("redis-server")
    with RedisServer(appendonly=True, data_dir=tmp_path / "redis") as server:
        yield server


# --- Task A: Redis restarts ------------------------------------------------------------------------

SLOW_CALL_S = 20.0
"""The busy job's model call: the stock kombu transport leaves a dead-consumer worker up this long."""
LIVENESS_S = 15.0
"""After Redis is back, a worker consumes again or has exited within this many seconds."""


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_a_worker_holding_an_unacked_message_keeps_consuming_through_three_redis_restarts(
        aof_redis: RedisServer, tmp_path: Path) -> None:
    from pipeline.offline_model import answer

    log = tmp_path / "worker.log"
    with LLMTestServer(default=lambda prompt: json.dumps(answer(prompt))) as llm:
        # (a visibility timeout longer than the test, so that no sweep redelivers the held message)
        env = worker_env(aof_redis.url, tmp_path / "data", MEMQ_LLM__MODEL="openai/test-model",
                         MEMQ_LLM__API_BASE=llm.url, MEMQ_LLM__API_KEY="test-key", MEMQ_LLM__TIMEOUT_S="60",
                         MEMQ_REDIS__VISIBILITY_TIMEOUT_S="300")
        producer = Producer(Settings(redis=RedisSettings(url=aof_redis.url), data_dir=tmp_path / "data"))
        worker = start_worker(env, log)
        try:
            # Given a worker that has finished a first job
            first = producer.wait([producer.add("I like tea.", user_id="warm-up")], timeout_s=240)
            assert first[0].status is JobState.SUCCEEDED, _tail(log)
            for n in range(3):
                # And a job whose model call is slow, so that the worker holds its message unacked
                # (acks_late) while it listens for more
                llm.script(Reply(content='{"facts": []}', delay_s=SLOW_CALL_S))
                calls = llm.calls
                busy = producer.add(f"I collect stamps, round {n}.", user_id=f"busy-{n}")
                _wait_for(lambda: llm.calls > calls, 60, "the slow model call starting")
                # When Redis stops for 2 s and starts again on the same port and data
                aof_redis.stop()
                time.sleep(2.0)  # the outage itself, not a wait for a condition
                aof_redis.start()
                # Then a job enqueued now succeeds soon, or the worker exits non-zero soon and, restarted
                # as a supervisor would, completes it: never up and idle
                probe = producer.add(f"I drink coffee, round {n}.", user_id=f"probe-{n}")
                status = producer.wait([probe], timeout_s=LIVENESS_S, poll_s=0.1)[0]
                if status.status is not JobState.SUCCEEDED:
                    assert worker.poll() is not None, f"round {n}: up and idle for {LIVENESS_S} s\n{_tail(log)}"
                    assert worker.returncode != 0, _tail(log)
                    worker = start_worker(env, log)
                    status = producer.wait([probe], timeout_s=240, poll_s=0.1)[0]
                assert status.status is JobState.SUCCEEDED, f"round {n}: {status.status}\n{_tail(log)}"
                producer.wait([busy], timeout_s=2 * SLOW_CALL_S)  # its outcome is not this test's concern
        finally:
            stop_worker(worker)
            producer.close()


def test_a_channel_closed_after_its_connection_was_collected_keeps_its_unacked_message_in_redis(
        aof_redis: RedisServer) -> None:
    # Given a consumer holding one unacked message with a BRPOP in flight, beside a fanout consumer,
    # as Celery's consumer is (task channel, remote-control and gossip channels)
    conn = Connection(aof_redis.url, transport="broker.transport:Transport",
                      transport_options={"visibility_timeout": 1})
    queue = Queue("liveness", Exchange("liveness"), "liveness")
    KombuProducer(conn.channel()).publish({"n": 1}, exchange=queue.exchange, routing_key="liveness",
                                          declare=[queue])
    received: list[Any] = []
    channel = conn.default_channel
    channel.basic_qos(0, 2, False)
    Consumer(channel, [queue], callbacks=[lambda body, message: received.append(message)]).consume()
    broadcast = Queue("liveness.bcast", Exchange("liveness.bcast", type="fanout"), auto_delete=True)
    Consumer(conn.channel(), [broadcast], callbacks=[lambda body, message: None], no_ack=True).consume()

    def delivered() -> bool:
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
        return len(received) == 1

    _wait_for(delivered, 10, "the message delivered")
    conn.transport.cycle.on_poll_start()  # sends BRPOP and SUBSCRIBE, as the event loop does
    assert channel._in_poll
    # When Redis goes away and the connection is torn down as Celery does after a connection loss
    aof_redis.stop()
    conn.collect(socket_timeout=1)
    conn.close()  # kombu 5.7's own transport raises AttributeError ('hostname') here
    # Then, once Redis is back, the message is still unacked in Redis and the visibility sweep restores it
    aof_redis.start()
    client = redis.Redis.from_url(aof_redis.url)
    assert client.hlen("unacked") == 1
    with Connection(aof_redis.url, transport="broker.transport:Transport",
                    transport_options={"visibility_timeout": 1}) as fresh:
        def swept() -> bool:
            fresh.default_channel.qos.restore_visible(num=10, interval=1)
            return int(client.llen("liveness")) == 1

        _wait_for(swept, 10, "the visibility sweep restoring the message")
    assert client.hlen("unacked") == 0
    client.close()


def test_a_worker_process_whose_consumer_stopped_exits_non_zero_within_its_grace_period() -> None:
    # Given a process that armed the exit deadline and then hangs (as a warm shutdown waiting for a
    # stuck task would)
    code = "import time; from broker.watchdog import exit_soon; exit_soon(0.5, 'test'); time.sleep(60)"
    started = time.monotonic()
    # When it runs, Then it ends with status 70 long before the hang would be over
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=30)
    assert proc.returncode == 70
    assert time.monotonic() - started < 30


# --- Task B: malformed messages --------------------------------------------------------------------

def _envelope(task: str, body: str, tag: str) -> dict[str, Any]:
    """A kombu Redis envelope of a Celery protocol-2 task message, its body given as is."""
    return {
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": str(uuid.uuid4()), "root_id": tag, "argsrepr": MARKER},
        "properties": {"correlation_id": tag, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": "memq.light"},
                       "delivery_tag": str(uuid.uuid4())},
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _malformed() -> dict[str, bytes]:
    """Each kind of malformed message, by its tag (``[name]``, found in what the poison list keeps);
    each also holds `MARKER`."""
    args = json.dumps([[MARKER], {}, {}]).encode()
    return {
        "[not-json]": f"{{not json {MARKER} [not-json]".encode(),
        "[json-not-envelope]": json.dumps({"a": 1, "note": f"{MARKER} [json-not-envelope]"}).encode(),
        "[unknown-task]": json.dumps(_envelope("memq.nope", _b64(args), "[unknown-task]")).encode(),
        "[body-not-base64]": json.dumps(_envelope("memq.start", f"%%{MARKER}%%", "[body-not-base64]")).encode(),
        "[body-not-json]": json.dumps(_envelope("memq.start", _b64(b"\xff\xfe" + MARKER.encode()),
                                                "[body-not-json]")).encode(),
        "[body-wrong-shape]": json.dumps(_envelope("memq.start", _b64(json.dumps([MARKER]).encode()),
                                                   "[body-wrong-shape]")).encode(),
    }


@pytest.mark.faults
@pytest.mark.timeout(420)
def test_malformed_messages_go_to_the_poison_list_and_the_worker_goes_on_consuming(tmp_path: Path) -> None:
    _need("redis-server")
    log = tmp_path / "worker.log"
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        producer = Producer(Settings(redis=RedisSettings(url=server.url), data_dir=tmp_path / "data"))
        worker = start_worker(worker_env(server.url, tmp_path / "data"), log)
        try:
            # Given a worker that has finished a first job
            first = producer.wait([producer.add("I like tea.", user_id="warm-up")], timeout_s=240)
            assert first[0].status is JobState.SUCCEEDED, _tail(log)
            # When each kind of malformed message is pushed onto its queue, then a normal add
            malformed = _malformed()
            for raw in malformed.values():
                client.lpush("memq.light", raw)
            probe = producer.add("I drink coffee.", user_id="after-poison")
            # Then the add succeeds and the worker is still up
            status = producer.wait([probe], timeout_s=90, poll_s=0.1)[0]
            assert status.status is JobState.SUCCEEDED, _tail(log)
            assert worker.poll() is None, _tail(log)
            # And every malformed message is in the poison list, counted once
            _wait_for(lambda: poison_count(client) >= len(malformed), 30, "every message moved aside")
            assert poison_count(client) == len(malformed) == client.llen(POISON_KEY)
            kept = poison_messages(client, limit=100)
            for tag in malformed:
                assert sum(tag.encode() in raw for raw in kept) == 1, tag
            # And the log names no message content
            assert MARKER not in log.read_text(errors="replace")
            # And an operator sees them counted with `memq poison list`
            listed = subprocess.run([sys.executable, "-m", "cli", "poison", "list"], capture_output=True, text=True,
                                    env=worker_env(server.url, tmp_path / "data"), timeout=60)
            assert f"{len(malformed)} poison messages" in listed.stdout and MARKER not in listed.stdout
        finally:
            stop_worker(worker)
            producer.close()
            client.close()

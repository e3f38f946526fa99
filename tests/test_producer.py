"""The producer: light import, validation at the edge, idempotency, one round trip per batch."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from memq.config import LimitsSettings, RedisSettings, Settings
from memq.errors import (
    BrokerUnavailable,
    EmptyMessages,
    ImageTooLarge,
    InvalidImage,
    InvalidMessage,
    InvalidMetadata,
    InvalidOption,
    InvalidRequest,
    InvalidScope,
    InvalidTimestamp,
    MessageTooLarge,
    MissingScope,
    RequestTooLarge,
    UnsafeImageURL,
)
from cli.redis_server import RedisServer
from producer import Producer
from tests.helpers import quiet_producer

HEAVY = ("litellm", "qdrant_client", "qdrant_edge", "neo4j", "torch", "sentence_transformers", "sqlmodel", "workers", "pipeline")


@pytest.fixture()
def quiet_db(redis_server: RedisServer) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer on a Redis database no worker reads, with small size limits, and a client to inspect it."""
    limits = LimitsSettings(max_message_chars=200, max_request_chars=1_000, max_image_url_chars=2_000,
                            max_request_image_url_chars=3_000, max_image_bytes=1_000)
    with quiet_producer(redis_server.url, limits=limits) as pair:
        yield pair



def test_importing_the_producer_loads_no_model_vector_or_graph_library() -> None:
    # Given a fresh interpreter, When it imports producer, Then none of the heavy libraries is loaded
    code = f"import sys, producer; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _image(data: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}


def _url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _nested(levels: int) -> dict[str, Any]:
    """Metadata `levels` + 1 objects deep: ``{"k": {"k": ... {"v": 1}}}``."""
    value: dict[str, Any] = {"v": 1}
    for _ in range(levels):
        value = {"k": value}
    return value


BAD_REQUESTS: list[tuple[str, Any, dict[str, Any], type[InvalidRequest]]] = [
    ("no scope id", "I like tea", {}, MissingScope),
    ("empty scope id", "I like tea", {"user_id": "  "}, InvalidScope),
    ("too long scope id", "I like tea", {"user_id": "u" * 129}, InvalidScope),
    ("non-string scope id", "I like tea", {"user_id": 42}, InvalidScope),
    ("empty message list", [], {"user_id": "u"}, EmptyMessages),
    ("only blank text", [{"role": "user", "content": "   "}], {"user_id": "u"}, EmptyMessages),
    ("unknown role", [{"role": "tool", "content": "x"}], {"user_id": "u"}, InvalidMessage),
    ("non-text content", [{"role": "user", "content": {"audio": b"x"}}], {"user_id": "u"}, InvalidMessage),
    ("non-text part", [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}], {"user_id": "u"},
     InvalidMessage),
    ("unknown message key", [{"role": "user", "content": "x", "tool_calls": []}], {"user_id": "u"}, InvalidMessage),
    ("message over the size limit", "x" * 201, {"user_id": "u"}, MessageTooLarge),
    ("metadata not JSON", "I like tea", {"user_id": "u", "metadata": {"when": object()}}, InvalidMetadata),
    ("metadata not a dict", "I like tea", {"user_id": "u", "metadata": ["a"]}, InvalidMetadata),
    ("metadata forging a scope", "I like tea", {"user_id": "u", "metadata": {"user_id": "other"}}, InvalidMetadata),
    ("metadata with NaN", "I like tea", {"user_id": "u", "metadata": {"x": float("nan")}}, InvalidMetadata),
    ("bad timestamp", "I like tea", {"user_id": "u", "timestamp": "yesterday"}, InvalidTimestamp),
    ("procedural memory without agent", "I like tea", {"user_id": "u", "memory_type": "procedural_memory"},
     MissingScope),
    # unbounded fields: each has a limit
    ("speaker name over its limit", [{"role": "user", "content": "hi", "name": "n" * 257}], {"user_id": "u"},
     MessageTooLarge),
    ("message id over its limit", [{"role": "user", "content": "hi", "id": "i" * 257}], {"user_id": "u"},
     MessageTooLarge),
    ("prompt over its limit", "I like tea", {"user_id": "u", "prompt": "p" * 20_001}, InvalidOption),
    ("image URL over its limit", [{"role": "user", "content": [_image("A" * 2_001)]}], {"user_id": "u"},
     MessageTooLarge),
    ("too many content parts", [{"role": "user", "content": [{"type": "text", "text": "a"}] * 101}],
     {"user_id": "u"}, MessageTooLarge),
    ("text of the whole add over its limit", [{"role": "user", "content": "x" * 199}] * 6, {"user_id": "u"},
     RequestTooLarge),
    ("image URLs of the whole add over their limit",
     [{"role": "user", "content": [_image("A" * 1_600), _image("B" * 1_600)]}], {"user_id": "u"}, RequestTooLarge),
    # accepted before, but the worker could not process it
    ("metadata deeper than the worker reads", "I like tea", {"user_id": "u", "metadata": _nested(220)},
     InvalidMetadata),
    ("metadata one level over the depth limit", "I like tea", {"user_id": "u", "metadata": _nested(32)},
     InvalidMetadata),
    ("timestamp a month after year 1", "I like tea", {"user_id": "u", "timestamp": "0001-01-15"}, InvalidTimestamp),
    ("timestamp that is year 0 in UTC", "I like tea", {"user_id": "u", "timestamp": "0001-01-01T00:00:00+05:00"},
     InvalidTimestamp),
    ("timestamp that is year 10000 in UTC", "I like tea",
     {"user_id": "u", "timestamp": "9999-12-31T23:59:59-05:00"}, InvalidTimestamp),
    # wrong error classes before: pydantic, Python or serialization errors
    ("lone surrogate in content", "I like tea \ud800", {"user_id": "u"}, InvalidMessage),
    ("lone surrogate in a text part", [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
     {"user_id": "u"}, InvalidMessage),
    ("lone surrogate in a speaker name", [{"role": "user", "content": "hi", "name": "A\ud83d"}], {"user_id": "u"},
     InvalidMessage),
    ("lone surrogate in a scope id", "I like tea", {"user_id": "u\ud800"}, InvalidScope),
    ("lone surrogate in a metadata key", "I like tea", {"user_id": "u", "metadata": {"\udc00": 1}}, InvalidMetadata),
    ("lone surrogate in a metadata value", "I like tea", {"user_id": "u", "metadata": {"k": ["\udc00"]}},
     InvalidMetadata),
    ("lone surrogate in the prompt", "I like tea", {"user_id": "u", "prompt": "Extract \ud800"}, InvalidOption),
    ("lone surrogate in the idempotency key", "I like tea", {"user_id": "u", "idempotency_key": "k\ud800"},
     InvalidOption),
    ("NUL in content", "I like\x00 tea", {"user_id": "u"}, InvalidMessage),
    ("300-deep metadata", "I like tea", {"user_id": "u", "metadata": _nested(300)}, InvalidMetadata),
    ("metadata deeper than Python's recursion limit", "I like tea", {"user_id": "u", "metadata": _nested(2_000)},
     InvalidMetadata),
    ("nested metadata key that is not a string", "I like tea", {"user_id": "u", "metadata": {"a": {1: "b"}}},
     InvalidMetadata),
    ("metadata integer beyond 64 bits", "I like tea", {"user_id": "u", "metadata": {"n": 2**64}}, InvalidMetadata),
    ("epoch timestamp 1e20", "I like tea", {"user_id": "u", "timestamp": 1e20}, InvalidTimestamp),
    ("epoch timestamp before year 1", "I like tea", {"user_id": "u", "timestamp": -1e11}, InvalidTimestamp),
    ("epoch timestamp too big for a float", "I like tea", {"user_id": "u", "timestamp": 10**400}, InvalidTimestamp),
    ("epoch timestamp in milliseconds", "I like tea", {"user_id": "u", "timestamp": 1_714_557_600_000},
     InvalidTimestamp),
    ("timestamp of another type", "I like tea", {"user_id": "u", "timestamp": [2024, 5, 1]}, InvalidTimestamp),
    ("role that is not a string", [{"role": ["user"], "content": "hi"}], {"user_id": "u"}, InvalidMessage),
    ("infer that is not a bool", "I like tea", {"user_id": "u", "infer": "yes"}, InvalidOption),
    ("unknown memory type", "I like tea", {"user_id": "u", "memory_type": "semantic"}, InvalidOption),
    # hostile images: refused before anything is enqueued, and never fetched
    *[(f"image URL {url}", [{"role": "user", "content": [_url(url)]}], {"user_id": "u"}, UnsafeImageURL) for url in (
        "http://127.0.0.1:6379/x.png", "http://localhost/x.png", "http://[::1]/x.png", "http://2130706433/x.png",
        "http://0x7f.0.0.1/x.png", "http://[::ffff:169.254.169.254]/", "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/", "http://10.1.2.3/x.png", "http://192.168.1.1/x.png",
        "file:///etc/passwd", "ftp://example.com/x.png", "gopher://example.com/", "http://user:pw@example.com/x.png",
        "javascript:alert(1)", "http://127\u30020\u30020\u30021/x.png", "http://\uff11\uff12\uff17.0.0.1/x.png",
        "http://\u24dbocalhost/x.png", "http://%31%32%37.0.0.1/x.png", "http://127.0.0.1\\.evil.com/x.png",
        "http://[::7f00:1]/x.png", "http://[64:ff9b:1::7f00:1]/x.png")],
    ("33 images in one add", [{"role": "user", "content": [_url(f"https://example.com/{n}.png") for n in range(33)]}],
     {"user_id": "u"}, RequestTooLarge),
    ("image detail that is not auto, low or high", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "ultra"}}]}],
     {"user_id": "u"}, InvalidMessage),
    ("data: URL claiming PNG but holding HTML", [{"role": "user", "content": [
        _image(base64.b64encode(b"<html><script>x()</script></html>").decode())]}], {"user_id": "u"}, InvalidImage),
    ("data: URL claiming PNG but holding a JPEG", [{"role": "user", "content": [
        _image(base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(40)).decode())]}], {"user_id": "u"}, InvalidImage),
    ("data: URL of type text/html", [{"role": "user", "content": [
        _url("data:text/html;base64," + base64.b64encode(b"<b>hi</b>").decode())]}], {"user_id": "u"}, InvalidImage),
    ("data: URL of type image/svg+xml", [{"role": "user", "content": [
        _url("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode())]}], {"user_id": "u"}, InvalidImage),
    ("data: URL that is not base64", [{"role": "user", "content": [_image("not*base64!")]}], {"user_id": "u"},
     InvalidImage),
    ("data: URL over the decoded size limit", [{"role": "user", "content": [
        _image(base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(1_200)).decode())]}], {"user_id": "u"}, ImageTooLarge),
    ("caption over its limit", [{"role": "user", "content": [
        {**_url("https://example.com/x.png"), "caption": "c" * 2_001}]}], {"user_id": "u"}, MessageTooLarge),
    ("caption that is not a string", [{"role": "user", "content": [
        {**_url("https://example.com/x.png"), "caption": 3}]}], {"user_id": "u"}, InvalidMessage),
]


@pytest.mark.parametrize(("case", "messages", "kwargs", "error"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_raises_a_named_error_and_enqueues_nothing(
    quiet_db: tuple[Producer, redis.Redis], case: str, messages: Any, kwargs: dict[str, Any],
    error: type[InvalidRequest],
) -> None:
    producer, client = quiet_db
    # When the bad request is added
    with pytest.raises(error) as raised:
        producer.add(messages, **kwargs)
    # Then the error says what is wrong and where, and Redis holds nothing at all
    assert str(raised.value) and raised.value.field
    assert client.dbsize() == 0


def test_a_batch_with_one_bad_request_enqueues_none_of_it(quiet_db: tuple[Producer, redis.Redis]) -> None:
    producer, client = quiet_db
    with pytest.raises(MissingScope, match=r"requests\[1\]"):
        producer.add_many([{"messages": "ok", "user_id": "u"}, {"messages": "no scope"}])
    assert client.dbsize() == 0


def test_the_same_idempotency_key_returns_the_same_job(quiet_db: tuple[Producer, redis.Redis]) -> None:
    producer, client = quiet_db
    # Given one add with a key
    first = producer.add("I like tea", user_id="u", idempotency_key="k-1")
    # When the same key is added again (even with other text)
    second = producer.add("I like coffee", user_id="u", idempotency_key="k-1")
    # Then the job is the same and only one start message is queued
    assert second.job_id == first.job_id and second.duplicate and not first.duplicate
    assert client.llen("memq.light") == 1
    assert producer.status(first.job_id, user_id="u").status.value == "queued"


def test_message_text_never_travels_in_the_task_message(quiet_db: tuple[Producer, redis.Redis]) -> None:
    producer, client = quiet_db
    receipt = producer.add("My bank PIN is 4321 and I live at 12 Elm Street.", user_id="u")
    [raw] = client.lrange("memq.light", 0, -1)
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"]).decode()
    # The message carries the job id only; the text is stored under the job (claim check)
    assert json.loads(body)[0] == [receipt.job_id]
    assert "4321" not in raw.decode() and "4321" not in body and "Elm" not in json.dumps(envelope["headers"])
    assert b"4321" in client.get(f"memq:job:{receipt.job_id}:request")


def test_add_many_enqueues_a_batch_in_one_round_trip() -> None:
    # Given a Redis server that only this producer talks to
    with RedisServer() as server:
        producer = Producer(Settings(redis=RedisSettings(url=server.url)))
        client = redis.Redis.from_url(server.url)
        producer.add("warm up the script cache", user_id="u")

        def calls() -> dict[str, int]:
            return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}

        # When a batch of 50 is enqueued
        before = calls()
        receipts = producer.add_many([{"messages": f"fact number {i}", "user_id": f"u{i % 5}"} for i in range(50)])
        after = calls()
        # Then the producer sent one command (EVALSHA); the rest ran inside that one script, per job (the
        # job's record, its place in its scope, its message, and the stamp the rescue sweep reads)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert delta.pop("evalsha") == 1 and delta.pop("info") == 1
        assert delta == {"set": 50, "incr": 50, "hset": 150, "zadd": 100, "lpush": 50, "time": 50}
        assert len({r.job_id for r in receipts}) == 50
        assert client.llen("memq.light") == 51
        producer.close()
        client.close()


def test_the_producer_raises_broker_unavailable_when_redis_is_down() -> None:
    # Given a Redis that was running and is now stopped
    server = RedisServer().start()
    producer = Producer(Settings(redis=RedisSettings(url=server.url, socket_timeout_s=1)))
    server.close()
    # When an add is attempted, Then it fails loudly
    with pytest.raises(BrokerUnavailable):
        producer.add("I like tea", user_id="u")


def test_real_images_pass_the_checks(quiet_db: tuple[Producer, redis.Redis]) -> None:
    producer, client = quiet_db
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(100)).decode()
    gif = base64.b64encode(b"GIF89a" + bytes(50)).decode()
    webp = base64.b64encode(b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(40)).decode()
    receipt = producer.add([{"role": "user", "content": [
        _image(png), _url("data:image/gif;base64," + gif), _url("data:image/webp;base64," + webp),
        {**_url("https://i.redd.it/l7hozpetnhlb1.jpg"), "caption": "a photo of a mural"},
        {"type": "image_url", "image_url": {"url": "http://93.184.215.14/a.jpg", "detail": "low"}, "alt": "a dog"}]}],
        user_id="u")
    assert producer.status(receipt.job_id, user_id="u").status.value == "queued"
    assert client.llen("memq.light") == 1


def test_add_many_queues_one_job_of_each_scope_in_turn_each_scopes_in_its_order(
        quiet_db: tuple[Producer, redis.Redis]) -> None:
    from producer.order import round_robin

    producer, client = quiet_db
    # Given a batch of three scopes' jobs, one scope after another (as a backfill reads them)
    users = ["a", "a", "a", "b", "b", "c"]
    receipts = producer.add_many([{"messages": f"note {i} of {u}", "user_id": u} for i, u in enumerate(users)])
    # Then the receipts are in the batch's order
    assert [r.scope.user_id for r in receipts] == users and len({r.job_id for r in receipts}) == 6
    # And the start messages go out (the end BRPOP takes from) one scope in turn: a, b, c, a, b, a
    out = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
           for raw in reversed(client.lrange("memq.light", 0, -1))]
    position = {r.job_id: i for i, r in enumerate(receipts)}
    assert [position[job_id] for job_id in out] == [0, 3, 5, 1, 4, 2]
    # And each scope's jobs keep the batch's order in the scope's sequence (the order their decides run in)
    seq = [int(client.hget(f"memq:job:{r.job_id}", "seq")) for r in receipts]
    assert seq[0] < seq[1] < seq[2] and seq[3] < seq[4]
    assert round_robin([]) == [] and round_robin(["x", "y", "x", "x", "z"]) == [0, 1, 4, 2, 3]

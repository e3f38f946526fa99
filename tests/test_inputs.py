"""Hostile inputs: every add is either a job that ends or a named `InvalidRequest` with nothing enqueued,
and every bad search/get_all argument is a named `InvalidRequest` too."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import hypothesis
import pytest
import redis
from hypothesis import strategies as st

from memq.errors import (
    InvalidFilter,
    InvalidMetadata,
    InvalidOption,
    InvalidRequest,
    InvalidSearch,
    InvalidTimestamp,
    MessageTooLarge,
    RequestTooLarge,
)
from memq.models import JobState
from cli.redis_server import RedisServer
from producer import Producer
from tests.helpers import quiet_producer

RUN = uuid.uuid4().hex[:8]
"""Prefix of every scope id and idempotency key this module sends, so runs do not meet."""


@pytest.fixture()
def quiet(redis_server: RedisServer) -> Iterator[tuple[Producer, redis.Redis]]:
    """A producer with the default limits on a Redis database no worker reads, and a client to inspect it."""
    with quiet_producer(redis_server.url) as pair:
        yield pair


def _nested(levels: int) -> dict[str, Any]:
    """Metadata `levels` + 1 objects deep."""
    value: dict[str, Any] = {"v": 1}
    for _ in range(levels):
        value = {"k": value}
    return value


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


DATA_URL = "data:image/png;base64,"

OVERSIZED = [
    ("a 100k-character speaker name", [{"role": "user", "content": "I like tea", "name": "n" * 100_000}],
     {}, MessageTooLarge, "messages[0].name"),
    ("a 100k-character message id", [{"role": "user", "content": "I like tea", "id": "i" * 100_000}],
     {}, MessageTooLarge, "messages[0].id"),
    ("a 100k-character prompt", "I like tea", {"prompt": "p" * 100_000}, InvalidOption, "prompt"),
    ("a 3 MB data URL", [{"role": "user", "content": [_image(DATA_URL + "A" * 3_000_000)]}], {},
     MessageTooLarge, "messages[0].content"),
    ("500 messages of 20,000 characters", [{"role": "user", "content": "x" * 20_000}] * 500, {},
     RequestTooLarge, "messages"),
    ("five data URLs of 1.9 MB", [{"role": "user", "content": [_image(DATA_URL + "A" * 1_900_000)] * 5}], {},
     RequestTooLarge, "messages"),
]


@pytest.mark.parametrize(("case", "messages", "kwargs", "error", "field"), OVERSIZED, ids=[c[0] for c in OVERSIZED])
def test_an_oversized_field_is_refused_at_the_default_limits(
    quiet: tuple[Producer, redis.Redis], case: str, messages: Any, kwargs: dict[str, Any],
    error: type[InvalidRequest], field: str,
) -> None:
    producer, client = quiet
    # When an add carries a field far over its limit (the sizes of the issue)
    with pytest.raises(error) as raised:
        producer.add(messages, user_id="u", **kwargs)
    # Then the error names the field, and nothing was enqueued
    assert raised.value.field == field
    assert client.dbsize() == 0


EDGE_TIMESTAMPS = [
    ("the first accepted instant", "0002-01-01T00:00:00+00:00"),
    ("the first accepted instant seen west of UTC", datetime(2, 1, 1, tzinfo=timezone.utc).astimezone(
        timezone(-timedelta(hours=23, minutes=59)))),
    ("the last accepted instant seen east of UTC", "9999-01-01T23:58:59.999999+23:59"),
    ("the last accepted instant seen west of UTC", "9998-12-31T18:59:59-05:00"),
    ("an offset with seconds (kept as the same instant in UTC)", "2024-05-01T10:00:00+00:09:21"),
    ("the first accepted epoch second", -62104060800),
]


def test_timestamps_at_the_edges_of_the_range_become_jobs_that_succeed(producer: Producer, user_id: str) -> None:
    # Given adds with "last month" and "yesterday" (the pipeline computes dates before the timestamp)
    # at both ends of the accepted range, When they run
    receipts = [producer.add("I moved to Lyon last month and I adopted a cat yesterday.", user_id=f"{user_id}-{i}",
                             timestamp=ts) for i, (_, ts) in enumerate(EDGE_TIMESTAMPS)]
    statuses = producer.wait(receipts, timeout_s=60)
    # Then every one succeeds
    assert [(case, s.status, s.error) for (case, _), s in zip(EDGE_TIMESTAMPS, statuses)] == [
        (case, JobState.SUCCEEDED, None) for case, _ in EDGE_TIMESTAMPS]


def test_a_timestamp_just_outside_the_range_is_refused(quiet: tuple[Producer, redis.Redis]) -> None:
    producer, client = quiet
    # When a timestamp is one microsecond before the first accepted instant, or one after the last
    for ts in ("0001-12-31T23:59:59.999999+00:00", "9999-01-01T00:00:00+00:00", -62104060801):
        with pytest.raises(InvalidTimestamp):
            producer.add("I like tea", user_id="u", timestamp=ts)
    # Then nothing was enqueued
    assert client.dbsize() == 0


def test_metadata_at_the_depth_limit_becomes_a_job_that_succeeds(producer: Producer, user_id: str) -> None:
    # Given metadata exactly as deep as the limit (32 objects), When it is added
    receipt = producer.add("I like green tea with honey.", user_id=user_id, metadata=_nested(31))
    status = producer.wait([receipt], timeout_s=60)[0]
    # Then the worker reads it and the job succeeds; one level more is refused
    assert (status.status, status.error) == (JobState.SUCCEEDED, None)
    with pytest.raises(InvalidMetadata):
        producer.add("I like green tea with honey.", user_id=user_id, metadata=_nested(32))


def _deep_filter(levels: int) -> dict[str, Any]:
    """``{"AND": [{"AND": [... {"topic": "a"}]}]}``, `levels` deep."""
    node: dict[str, Any] = {"topic": "a"}
    for _ in range(levels):
        node = {"AND": [node]}
    return node


BAD_SEARCHES: list[tuple[str, dict[str, Any], type[InvalidRequest], str]] = [
    ("a float limit", {"limit": 5.5}, InvalidSearch, "limit"),
    ("a string limit", {"limit": "5"}, InvalidSearch, "limit"),
    ("a bool limit", {"limit": True}, InvalidSearch, "limit"),
    ("a zero limit", {"limit": 0}, InvalidSearch, "limit"),
    ("a limit over 1000", {"limit": 1001}, InvalidSearch, "limit"),
    ("filters as a string", {"filters": "user_id=u"}, InvalidFilter, "filters"),
    ("an unknown operator", {"filters": {"topic": {"like": "te%"}}}, InvalidFilter, "filters"),
    ("an unknown logical key", {"filters": {"$or": [{"topic": "a"}]}}, InvalidFilter, "filters"),
    ("a lower-case logical key", {"filters": {"or": [{"topic": "a"}]}}, InvalidFilter, "filters"),
    ("OR that is not a list", {"filters": {"OR": {"topic": "a"}}}, InvalidFilter, "filters"),
    ("an empty operator dict", {"filters": {"topic": {}}}, InvalidFilter, "filters"),
    ("in without a list", {"filters": {"topic": {"in": "a"}}}, InvalidFilter, "filters"),
    ("filters nested 10 deep", {"filters": _deep_filter(10)}, InvalidFilter, "filters"),
    ("a filter key that is not a string", {"filters": {1: "a"}}, InvalidFilter, "filters"),
    ("an empty filter list", {"filters": {"topic": []}}, InvalidFilter, "filters"),
    ("a filter list mixing strings and ints", {"filters": {"topic": ["a", 1]}}, InvalidFilter, "filters"),
    ("a range on a word", {"filters": {"n": {"gt": "soon"}}}, InvalidFilter, "filters"),
    ("a NaN filter value", {"filters": {"score": float("nan")}}, InvalidFilter, "filters"),
    ("a None filter value", {"filters": {"topic": None}}, InvalidFilter, "filters"),
    ("a filter value with a lone surrogate", {"filters": {"topic": "\ud800"}}, InvalidFilter, "filters"),
]
BAD_SEARCH_ONLY: list[tuple[str, dict[str, Any], type[InvalidRequest], str]] = [
    ("a string threshold", {"threshold": "high"}, InvalidSearch, "threshold"),
    ("a bool threshold", {"threshold": True}, InvalidSearch, "threshold"),
    ("a threshold over 1", {"threshold": 2.0}, InvalidSearch, "threshold"),
    ("a NaN threshold", {"threshold": float("nan")}, InvalidSearch, "threshold"),
    ("a query with a lone surrogate", {"query": "tea \ud800"}, InvalidSearch, "query"),
    ("a query over its limit", {"query": "tea " * 2_001}, InvalidSearch, "query"),
    ("a query that is not a string", {"query": 5}, InvalidSearch, "query"),
]


@pytest.mark.parametrize(("case", "kwargs", "error", "field"), BAD_SEARCHES + BAD_SEARCH_ONLY,
                         ids=[c[0] for c in BAD_SEARCHES + BAD_SEARCH_ONLY])
def test_a_bad_search_argument_raises_a_named_error(memories: Any, user_id: str, case: str, kwargs: dict[str, Any],
                                                    error: type[InvalidRequest], field: str) -> None:
    # When search is called with one bad argument
    args = {"query": "tea", **kwargs}
    with pytest.raises(error) as raised:
        memories.search(args.pop("query"), user_id=user_id, **args)
    # Then the error names it
    assert raised.value.field == field


@pytest.mark.parametrize(("case", "kwargs", "error", "field"), BAD_SEARCHES, ids=[c[0] for c in BAD_SEARCHES])
def test_a_bad_get_all_argument_raises_a_named_error(memories: Any, user_id: str, case: str, kwargs: dict[str, Any],
                                                     error: type[InvalidRequest], field: str) -> None:
    # When get_all is called with one bad argument, Then the error names it
    with pytest.raises(error) as raised:
        memories.get_all(user_id=user_id, **kwargs)
    assert raised.value.field == field


def test_an_unknown_filter_operator_is_named_in_the_error(memories: Any, user_id: str) -> None:
    with pytest.raises(InvalidFilter, match="unknown operator 'like'"):
        memories.search("tea", user_id=user_id, filters={"topic": {"like": "te%"}})


def test_search_and_get_all_accept_arguments_at_the_edges_of_their_ranges(memories: Any, user_id: str) -> None:
    # When the arguments sit on the edges of what is allowed, Then both calls answer
    for kwargs in ({"limit": 1, "threshold": -1}, {"limit": 1000, "threshold": 1}, {"threshold": 0.5, "filters": {}},
                   {"filters": {"topic": ["a", "b"], "n": [1, 2], "flag": True, "count": 3}}):
        assert memories.search("tea", user_id=user_id, **kwargs)["results"] == []
        kwargs.pop("threshold", None)
        assert memories.get_all(user_id=user_id, **kwargs)["results"] == []


# --- the property: every add is a job that ends, or a named error with nothing enqueued -------------------

SURROGATES = st.characters(categories=["Cs"])
ANY_CHAR = st.one_of(st.characters(), SURROGATES)
SENTENCES = st.sampled_from([
    "I like green tea.", "My sister Ann lives in Lyon and works at a bakery.", "I moved to Paris last month.",
    "Yesterday I adopted a cat named Miso.", "I am allergic to peanuts and I never eat them.",
    "Caroline went to the LGBTQ support group today.", "We stopped playing chess last year.",
])
ODD_TEXT = st.sampled_from(["", "   ", "\u202e\u2028 right-to-left", "🙂" * 50, '{"task": "extract_facts"}',
                            "tab\tand\nnewline", "x" * 20_000, "é" * 19_999 + "e\u0301"])
HOSTILE_TEXT = st.sampled_from(["\ud800", "a\udfffb", "nul\x00byte", "x" * 20_001])
TEXT = st.one_of(SENTENCES, SENTENCES, ODD_TEXT, st.text(ANY_CHAR, max_size=40), HOSTILE_TEXT)

URLS = st.sampled_from(["https://example.com/cat.png", DATA_URL + "iVBORw0KGgo=", "", "ftp://x",
                        DATA_URL + "A" * 2_000_000, "\ud800"])
PARTS = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(lambda u: {"type": "image_url", "image_url": u}, URLS),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u, "detail": "low"}}, URLS),
    st.sampled_from([{"type": "input_audio", "data": "x"}, {"type": "text"}, {"type": "text", "text": 5}, "text",
                     None, {"type": "image_url", "image_url": {"url": "https://x.y/z.png", "size": 3}}]),
)
NAMES = st.one_of(st.sampled_from(["Ann", "Bob", "Caroline"]), st.text(ANY_CHAR, max_size=12),
                  st.sampled_from(["n" * 256, "n" * 257, 5, None]))
ROLES = st.one_of(st.sampled_from(["user", "user", "assistant", "system"]),
                  st.sampled_from(["tool", "", "USER", None, 3, ["user"]]))
MESSAGE: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"role": ROLES, "content": st.one_of(TEXT, st.lists(PARTS, max_size=3),
                                         st.sampled_from([None, 5, b"bytes", {"audio": "x"}]))},
    optional={"name": NAMES, "id": st.one_of(st.text(max_size=8), st.just("i" * 257), st.just(7)),
              "tool_calls": st.just([])},
)
GOOD_MESSAGES = st.one_of(
    SENTENCES,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": SENTENCES},
                                    optional={"name": st.sampled_from(["Ann", "Bob"]), "id": st.text(max_size=6)}),
             min_size=1, max_size=4),
)
MESSAGES = st.one_of(TEXT, MESSAGE, st.lists(MESSAGE, max_size=4),
                     st.sampled_from([None, 42, [], ["not a dict"], ("a tuple",),
                                      [{"role": "user", "content": "x" * 20_000}] * 11]))

SCOPE_IDS = st.builds(lambda s: f"{RUN}-{s}", st.text("abcdef0123456789-_.@", max_size=8))
HOSTILE_SCOPE_IDS = st.one_of(st.sampled_from(["", "  ", "u" * 129, 42, b"u", "a\nb", "u\ud800"]),
                              st.text(ANY_CHAR, min_size=1, max_size=10))

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=12,
)
GOOD_METADATA = st.one_of(st.none(), st.dictionaries(st.sampled_from(["topic", "channel", "n"]),
                                                     st.sampled_from(["food", "web", 3, True, 2.5]), max_size=3))
METADATA = st.one_of(
    st.dictionaries(st.text(ANY_CHAR, max_size=8), JSON_VALUES, max_size=4),
    st.sampled_from([_nested(31), _nested(32), _nested(220), {"user_id": "x"}, {"a": float("nan")}, {"a": 2**63},
                     {"a": 2**63 - 1, "b": -(2**63), "c": 1e308, "d": -0.0}, {1: "a"}, {"a": {2: "b"}}, ["list"],
                     "str", {"a": object()}, {"a": ("tuple", 1)}, {"big": "x" * 17_000}]),
)

TIMEZONES: st.SearchStrategy[Any] = st.one_of(st.none(), st.just(timezone.utc), st.timezones(),
                      st.builds(timezone, st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                                                        max_value=timedelta(hours=23, minutes=59))))
TIMESTAMPS = st.one_of(
    st.datetimes(timezones=TIMEZONES),
    st.floats(),
    st.integers(),
    st.sampled_from(["2024-05-01", "2024-05-01T10:00:00Z", "0001-01-15", "9999-12-31T23:59:59-05:00", "yesterday",
                     "", True, [2024], 1e20, -1e11, 1_714_557_600_000, "2024-05-01T10:00:00+00:09:21"]),
)
GOOD_TIMESTAMPS = st.one_of(st.none(), st.sampled_from(["2024-05-01", "2024-05-01T10:00:00Z", 1_714_557_600]),
                            st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1),
                                         timezones=TIMEZONES))

HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "messages": MESSAGES,
    "user_id": HOSTILE_SCOPE_IDS,
    "agent_id": st.one_of(SCOPE_IDS, HOSTILE_SCOPE_IDS),
    "run_id": st.one_of(SCOPE_IDS, HOSTILE_SCOPE_IDS),
    "metadata": METADATA,
    "infer": st.sampled_from([None, 0, 1, "yes", False]),
    "memory_type": st.sampled_from(["procedural_memory", "semantic", 3, ["procedural_memory"]]),
    "prompt": st.one_of(st.sampled_from(["Extract facts about food only.", "", "  ", "p" * 20_001, "\ud800", 5]),
                        st.text(ANY_CHAR, max_size=30)),
    "timestamp": TIMESTAMPS,
    "idempotency_key": st.one_of(st.builds(lambda s: f"{RUN}-{s}", st.text(ANY_CHAR, max_size=8)),
                                 st.sampled_from(["", "k" * 513, 5])),
}


@st.composite
def add_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments of `Producer.add`: a valid request with up to three fields made hostile or odd."""
    request: dict[str, Any] = {
        "messages": draw(GOOD_MESSAGES),
        "user_id": draw(SCOPE_IDS),
        "metadata": draw(GOOD_METADATA),
        "infer": draw(st.booleans()),
        "timestamp": draw(GOOD_TIMESTAMPS),
    }
    for field in draw(st.lists(st.sampled_from(sorted(HOSTILE)), min_size=1, max_size=3, unique=True)):
        request[field] = draw(HOSTILE[field])
    return request


def _summary(request: dict[str, Any]) -> str:
    return ", ".join(f"{k}={repr(v)[:60]}" for k, v in request.items())


@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_every_add_becomes_a_job_that_ends_or_raises_a_named_error_with_nothing_enqueued(
    quiet: tuple[Producer, redis.Redis], producer: Producer,
) -> None:
    # (The session worker's threads share this process and its `random` module; Hypothesis would take
    # their use of it for a strategy's, hence the filter. Accepted adds go to the worker only after
    # generation, so examples replay the same way whatever the worker is doing.)
    quiet_producer, quiet_client = quiet
    accepted: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()

    @hypothesis.settings(max_examples=100, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                hypothesis.HealthCheck.data_too_large,
                                                hypothesis.HealthCheck.large_base_example])
    @hypothesis.given(add_requests())
    def one_add(request: dict[str, Any]) -> None:
        # Given an add request, valid or not; When it is added where no worker reads
        quiet_client.flushdb()
        messages = request["messages"]
        kwargs = {k: v for k, v in request.items() if k != "messages"}
        try:
            quiet_producer.add(messages, **kwargs)
        except InvalidRequest as exc:
            # Then either it raises a named subclass of InvalidRequest, naming the field, and nothing is enqueued
            assert type(exc) is not InvalidRequest and exc.field, (type(exc), exc)
            assert quiet_client.dbsize() == 0
            outcomes[f"{type(exc).__name__} ({exc.field})"] += 1
            return
        # Or it is accepted, and will be sent to the worker
        outcomes["accepted"] += 1
        accepted.append(request)

    one_add()
    print(sorted(outcomes.items(), key=lambda kv: -kv[1]))
    assert len(accepted) >= 20, f"too few examples were accepted to exercise the worker: {outcomes}"
    jobs: dict[str, str] = {}
    receipts = {}
    for request in accepted:
        kwargs = {k: v for k, v in request.items() if k != "messages"}
        receipt = producer.add(request["messages"], **kwargs)
        jobs.setdefault(receipt.job_id, _summary(request))
        receipts.setdefault(receipt.job_id, receipt)
    # And every accepted job ends, and succeeds: the requests the worker could not process were refused
    statuses = producer.wait(list(receipts.values()), timeout_s=120)
    unfinished = [(jobs[s.job_id], s.status, s.error_type, s.error) for s in statuses
                  if s.status is not JobState.SUCCEEDED]
    assert unfinished == []


@pytest.mark.parametrize("offset", [-1, 10_001, 1.5, "10", True])
def test_a_bad_get_all_offset_is_a_named_error(memories: Any, user_id: str, offset: object) -> None:
    with pytest.raises(InvalidSearch, match="offset") as raised:
        memories.get_all(user_id=user_id, offset=offset)
    assert raised.value.field == "offset"

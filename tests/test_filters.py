"""The filter language itself (`memq.filters`): what parses, what is refused, and the relaxation that
lets a backend apply part of a filter and Python the rest. Backends are held to `evaluate` by the
vector store contract (tests/test_vector_contract.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memq.errors import InvalidFilter
from memq.filters import Logic, Match, evaluate, parse_filters, relax


def test_the_mem0_forms_parse_into_one_tree() -> None:
    node = parse_filters({"topic": "food", "n": {"gte": 2, "lt": 5}, "city": "*", "tags": ["a", "b"],
                          "created_at": {"gte": "2024-05-01T00:00:00Z"},
                          "OR": [{"actor_id": "Ann"}, {"NOT": [{"role": "assistant"}]}]})
    assert node == Logic("and", (
        Match("topic", "eq", "food"), Match("n", "gte", 2), Match("n", "lt", 5), Match("city", "exists"),
        Match("tags", "in", ("a", "b")), Match("created_at", "gte", datetime(2024, 5, 1, tzinfo=timezone.utc)),
        Logic("or", (Logic("and", (Match("actor_id", "eq", "Ann"),)),
                     Logic("and", (Logic("not", (Logic("and", (Match("role", "eq", "assistant"),)),)),))))))
    assert parse_filters(None) is None and parse_filters({}) is None


@pytest.mark.parametrize(("filters", "message"), [
    ({"topic": {"like": "x"}}, "unknown operator 'like'"),
    ({"$and": [{"a": 1}]}, "unknown logical key"),
    ({"Not": [{"a": 1}]}, "unknown logical key"),
    ({"AND": []}, "non-empty list"),
    ({"n": {"in": [1, "a"]}}, "list of strings or a list of integers"),
    ({"n": {"in": [1.5]}}, "list of strings or a list of integers"),
    ({"n": {"gt": "tomorrow"}}, "number or an ISO-8601 date"),
    ({"n": {"gt": True}}, "number or an ISO-8601 date"),
    ({"topic": {"contains": ""}}, "non-empty string"),
    ({"topic": None}, "values are strings"),
    ({"topic": {"eq": [1]}}, "values are strings"),
    ({"n": 2**64}, "values are strings"),
    ({f"k{i}": i for i in range(101)}, "more than 100 conditions"),
    ({"topic": {"in": [str(i) for i in range(1_001)]}}, "list of 1..1000 values"),
    ({"meta.x": 1}, "one top-level payload field"),
    ({"tags[]": "a"}, "one top-level payload field"),
    ({"user_id ": "ann"}, "one top-level payload field"),
    ({"job_id": "j"}, "bookkeeping"),
    ({"topic": {"exists": True}}, "unknown operator 'exists'"),
    ({"created_at": {"gte": 1.0}}, "ISO-8601 date or a datetime"),
    ({"topic": "x" * 4_097}, "the limit is 4096"),
    ({"topic": {"icontains": "x" * 4_097}}, "the limit is 4096"),
], ids=lambda v: str(v)[:40])
def test_bad_filters_are_named_errors(filters: Any, message: str) -> None:
    with pytest.raises(InvalidFilter, match=message) as raised:
        parse_filters(filters)
    assert raised.value.field == "filters"


KEYS = st.sampled_from(["a", "b", "c"])
VALUES = st.sampled_from(["x", "Xy", "y", 1, 2, True])
MATCHES = st.one_of(
    st.builds(lambda k, v: {k: v}, KEYS, VALUES),
    st.builds(lambda k: {k: "*"}, KEYS),
    st.builds(lambda k, s: {k: {"icontains": s}}, KEYS, st.sampled_from(["x", "Y"])),
    st.builds(lambda k, s: {k: {"contains": s}}, KEYS, st.sampled_from(["x", "y"])),
    st.builds(lambda k, n: {k: {"gte": n}}, KEYS, st.sampled_from([1, 2])),
    st.builds(lambda k, v: {k: {"ne": v}}, KEYS, VALUES),
)
FILTERS = st.recursive(MATCHES, lambda inner: st.one_of(
    st.builds(lambda op, parts: {op: parts}, st.sampled_from(["AND", "OR", "NOT"]), st.lists(inner, min_size=1,
                                                                                             max_size=3))),
    max_leaves=8)
PAYLOADS = st.dictionaries(KEYS, st.one_of(VALUES, st.lists(VALUES, max_size=2)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(FILTERS, st.lists(PAYLOADS, min_size=1, max_size=6))
def test_relaxing_a_condition_never_loses_a_match(filters: dict[str, Any], payloads: list[dict[str, Any]]) -> None:
    # What a backend applies (the filter without icontains) keeps every point the whole filter keeps,
    # so evaluating the whole filter on the backend's answer is exact
    node = parse_filters(filters)
    relaxed = relax(node, "icontains") if node is not None else None
    for payload in payloads:
        if evaluate(node, payload):
            assert evaluate(relaxed, payload)

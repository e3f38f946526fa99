"""Temporal grounding: dates resolved against the session date, carried to the payload, searched by range."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import qdrant_edge as qe

from memq.checks import check_time_range
from memq.config import LLMSettings
from memq.errors import InvalidTimeRange
from memq.models import AddJob, JobState, Message, Scope
from pipeline.dates import resolve
from pipeline.extract import extract_facts
from pipeline.llm import LLM
from pipeline.types import CaptionedMessages
from stores.edge import EdgeStore, edge_point, open_edge
from stores.occurred import TimeRange
from tests.helpers import wait_done
from tests.rigs.llm_server import LLMTestServer

SESSION = datetime(2023, 5, 8, 13, 56, tzinfo=timezone.utc)  # a Monday, LoCoMo's "1:56 pm on 8 May, 2023"


def _day(d: int, month: int = 5, year: int = 2023) -> datetime:
    return datetime(year, month, d, tzinfo=timezone.utc)


@pytest.mark.parametrize(("text", "expected", "period"), [
    ("Caroline went to the LGBTQ support group yesterday", _day(7), "day"),
    ("Jon went hiking two days ago", _day(6), "day"),
    ("Jon quit his job a few days ago", _day(5), "day"),
    ("Melanie ran a charity race last Saturday", _day(6), "day"),
    ("Jon met Gina last week", _day(1), "week"),
    ("Jon went camping last weekend", _day(6), "week"),
    ("Caroline is going to a conference next month", _day(1, 6), "month"),
    ("Melanie painted a sunrise last year", _day(1, 1, 2022), "year"),
    ("Nate won a tournament on 7 May 2023 and again yesterday", _day(7), "day"),  # the explicit date wins
    ("Nate won a tournament on 2 April 2023 after training yesterday", _day(2, 4), "day"),
    ("The week before 9 June 2023", _day(2, 6), "week"),                       # LoCoMo's answer forms
    ("The sunday before 25 May 2023", _day(21), "day"),
])
def test_relative_and_explicit_dates_resolve_against_the_session_date(text: str, expected: datetime,
                                                                       period: str) -> None:
    found = resolve(text, SESSION)
    assert found is not None and (found.when, found.period) == (expected, period)


@pytest.mark.parametrize("text", ["Nate has been doing this for 3 years now", "Ann may go camping",
                                  "Ann goes hiking on Saturdays", "Ann saw a deer at the park"])
def test_durations_bare_month_and_weekday_names_are_not_dates(text: str) -> None:
    assert resolve(text, SESSION) is None


def test_a_time_range_is_after_inclusive_before_exclusive_in_utc() -> None:
    assert check_time_range(date(2023, 5, 7), "2023-05-08") == (_day(7), _day(8))
    assert check_time_range(datetime(2023, 5, 7, 12), None) == (datetime(2023, 5, 7, 12, tzinfo=timezone.utc), None)
    assert check_time_range(None, None) == (None, None)


@pytest.mark.parametrize(("after", "before"), [
    ("2023-05-09", "2023-05-01"), (date(2023, 5, 7), date(2023, 5, 7)), ("last week", None), (None, 1683500000),
    (True, None), (None, [2023, 5, 1]), ("2023-13-45", None), (datetime(1, 1, 1), None)])
def test_a_bad_time_range_raises_a_named_error(after: object, before: object) -> None:
    with pytest.raises(InvalidTimeRange):
        check_time_range(after, before)


def _job(text: str) -> tuple[AddJob, CaptionedMessages]:
    messages = [Message(role="user", content=text, name="Ann")]  # type: ignore[arg-type]
    return (AddJob(job_id="j", scope=Scope(user_id="ann"), messages=messages, timestamp=SESSION),
            CaptionedMessages(messages=messages))


def test_a_models_dates_are_parsed_and_a_missing_or_invalid_one_falls_back(llm_server: LLMTestServer) -> None:
    llm = LLM(LLMSettings(model="openai/test-model", api_base=llm_server.url, api_key="test-key"))  # type: ignore[arg-type]
    llm_server.reset()
    llm_server.script(json.dumps({"facts": [
        {"text": "Ann adopted a cat on 2 May 2023", "sources": [0], "date": "2023-05-02"},
        {"text": "Ann ran a race last Saturday", "sources": [0], "date": "sometime in spring"},
        {"text": "Ann lives in Lyon", "sources": [0]},
        {"text": "Ann sang in a choir", "sources": [0], "date": 20230507},
        {"text": "Ann met Bob", "sources": [0], "date": "2023-05-04T22:30:00-03:00"}]}))
    job, captioned = _job("a long day")
    # When the extract stage runs with temporal grounding on
    out = extract_facts(job, captioned, llm, temporal=True)
    # Then the prompt asked for a date per fact and for absolute dates, with the session date
    request = llm_server.requests[-1]["messages"]
    assert '"date": "<YYYY-MM-DD>"' in request[0]["content"] and "absolute date" in request[0]["content"]
    assert '"conversation_date": "2023-05-08"' in request[1]["content"] and '"dates": true' in request[1]["content"]
    # And the model's date wins; an invalid one falls back to the text's phrase, then to the session date
    assert [f.occurred_at for f in out.facts] == [_day(2), _day(6), SESSION, SESSION,
                                                  datetime(2023, 5, 5, 1, 30, tzinfo=timezone.utc)]


def test_without_temporal_grounding_no_date_is_asked_for_or_kept(llm_server: LLMTestServer) -> None:
    llm = LLM(LLMSettings(model="openai/test-model", api_base=llm_server.url, api_key="test-key"))  # type: ignore[arg-type]
    llm_server.reset()
    job, captioned = _job("I went to a support group yesterday.")
    out = extract_facts(job, captioned, llm)
    assert out.facts and all(f.occurred_at is None for f in out.facts)
    assert '"date"' not in llm_server.requests[-1]["messages"][0]["content"]


def test_the_date_survives_the_pipeline_into_the_payload_and_search_filters_by_it(
        producer: Any, memories: Any, user_id: str) -> None:
    # Given a backfilled session on 8 May 2023 whose facts refer to three other days
    text = ("I went to a support group yesterday. I ran a charity race last Saturday. "
            "I adopted my puppy Max on 2 May 2023. I work as a nurse in Boston.")
    status = wait_done(producer, producer.add([{"role": "user", "name": "Ann", "content": text}], user_id=user_id,
                                              timestamp=SESSION))
    assert status.status is JobState.SUCCEEDED, status.error
    # Then each memory keeps the date its fact refers to (the session date when it names none)
    stored = {m["memory"].split(" (")[0]: m["occurred_at"] for m in memories.get_all(user_id=user_id)["results"]}
    assert sorted(datetime.fromisoformat(d) for d in stored.values()) == [_day(2), _day(6), _day(7), SESSION]
    # And the payload holds it in a form the store range-filters (ISO and epoch seconds)
    store = memories.vectors
    if isinstance(store, EdgeStore):
        record = store.shard.retrieve([memories.get_all(user_id=user_id)["results"][0]["id"]], with_payload=True,
                                      with_vector=False)[0]
        assert datetime.fromisoformat(record.payload["occurred_at"]).timestamp() == record.payload["occurred_ts"]
    # When the same query is searched within 6..7 May (before exclusive), then outside it
    inside = memories.search("What did Ann do?", user_id=user_id, after=date(2023, 5, 6), before=date(2023, 5, 8))
    later = memories.search("What did Ann do?", user_id=user_id, after="2023-05-08")
    # Then only the memories of those days come back, each with its occurred_at
    assert sorted(r["occurred_at"][:10] for r in inside["results"]) == ["2023-05-06", "2023-05-07"]
    assert [datetime.fromisoformat(r["occurred_at"]) for r in later["results"]] == [SESSION]
    # And another scope's search with the same range finds nothing of Ann's
    assert memories.search("What did Ann do?", user_id=user_id + "-other", after=date(2023, 5, 1))["results"] == []
    # And a bad range is refused with a named error
    with pytest.raises(InvalidTimeRange):
        memories.search("What did Ann do?", user_id=user_id, after="2023-05-09", before="2023-05-01")


def test_points_written_before_temporal_grounding_read_as_undated_and_stay_out_of_ranges(tmp_path: Path) -> None:
    # Given a shard written before grounding (no occurred_* fields; one Mem0 metadata key of that name)
    folder = tmp_path / "edge"
    shard = qe.EdgeShard.create(str(folder / "old"), qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=4, distance=qe.Distance.Cosine)))
    legacy = {"data": "Ann likes tea", "hash": "h", "created_at": "2023-01-01T00:00:00+00:00", "user_id": "ann"}
    shard.update(qe.UpdateOperation.upsert_points([
        qe.Point("00000000-0000-0000-0000-000000000001", [1.0, 0, 0, 0], legacy),
        qe.Point("00000000-0000-0000-0000-000000000002", [1.0, 0, 0, 0], {**legacy, "occurred_at": "last summer"})]))
    shard.close()
    # When memq opens it (adding its indexes and BM25 terms) and searches
    store = open_edge(folder, "old", 4)
    try:
        hits = store.search([1.0, 0, 0, 0], Scope(user_id="ann"), limit=5)
        ranged = store.search([1.0, 0, 0, 0], Scope(user_id="ann"), limit=5, during=TimeRange(after=_day(1, 1, 2000)))
    finally:
        store.close()
    # Then both read with occurred_at None (no crash on a value that is no date), and no range selects them
    assert len(hits) == 2 and all(h.occurred_at is None for h in hits)
    assert ranged == []


def test_a_weekend_resolves_in_utc_whatever_the_session_dates_offset() -> None:
    # Given the same moment (8 May 2023, 04:00 UTC) written in UTC and at -05:00
    in_utc = datetime(2023, 5, 8, 4, 0, tzinfo=timezone.utc)
    at_minus_five = datetime.fromisoformat("2023-05-07T23:00:00-05:00")
    utc_answer = resolve("I went hiking last weekend.", in_utc)
    offset_answer = resolve("I went hiking last weekend.", at_minus_five)
    # Then "last weekend" is the same Saturday both ways, as every other relative date is
    assert utc_answer is not None and offset_answer is not None
    assert offset_answer.when == utc_answer.when == datetime(2023, 5, 6, tzinfo=timezone.utc)

"""The SQL stores' contract, on SQLite and on a real PostgreSQL: the history store (`stores.history`,
opened by `open_history_store`) and the record store (`stores.records`: job records and dead letters,
opened on the same engine as `jobs.clients` does).

Each test gets a fresh database: a SQLite file in its tmp folder, or a new database on the session's
PostgreSQL server (whose TimeZone is +05:30, so a timestamp that loses its zone shows). PostgreSQL's own
risks are covered too: timestamps in other zones, unicode and long text in indexed and plain columns,
two writers of the same rows at once, tables created by many processes at once, more keys than one
statement takes, an exhausted pool, a server that stops and one that never answers.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine

from memq.errors import InvalidJob, StoreUnavailable
from memq.models import AddJob, JobState, MemoryEvent, Message, Role, Scope, utcnow
import stores.history as history_module
from stores.history import HistoryRecord, HistoryStore, open_history_store, sql_engine
from stores.records import RecordStore
from tests.rigs.postgres_server import PostgresServer

T = TypeVar("T")

UTC = timezone.utc
IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))
T0 = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

UNICODE = "Zoë ❤️ 東京 עברית e\u0301 𝄞 🧑🏽‍🚀 \u200d\u2028 'quotes' \"double\" back\\slash %s %(x)s ; -- "
"""Accents, combining marks, CJK, right-to-left, astral planes, ZWJ sequences, a line separator, and
characters that matter to SQL and to drivers' parameter styles."""


@dataclass
class Stores:
    """The two stores on one fresh database."""

    url: str
    history: HistoryStore
    records: RecordStore


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes fresh, empty databases (returns each one's URL): SQLite files in the test's tmp folder, or
    new databases on the session's PostgreSQL."""
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.create_database
    numbers = itertools.count()
    return lambda: f"sqlite:///{tmp_path / f'history-{next(numbers)}.db'}"


@pytest.fixture()
def database_url(new_database: Callable[[], str]) -> str:
    """One fresh, empty database."""
    return new_database()


@pytest.fixture()
def stores(database_url: str) -> Iterator[Stores]:
    """Both stores, opened the way the workers open them (one engine per URL)."""
    history = open_history_store(database_url)
    yield Stores(database_url, history, RecordStore(sql_engine(database_url)))
    history.engine.dispose()  # the URL is never used again: give its connections back


def row(id: str, memory_id: str = "m1", *, event: MemoryEvent = MemoryEvent.ADD, created_at: datetime = T0,
        position: int = 0, job_id: str = "job-1", **fields: Any) -> HistoryRecord:
    """A history row (ADD of "x" by default)."""
    values: dict[str, Any] = {"new_memory": "x", "user_id": "alice", **fields}
    return HistoryRecord(id=id, memory_id=memory_id, event=event.value, created_at=created_at, position=position,
                         job_id=job_id, **values)


def job(job_id: str = "job-1", *, user_id: str = "alice", agent_id: str | None = None, key: str | None = None,
        text: str = "I like tea", enqueued_at: datetime = T0) -> AddJob:
    """An add job of one user message."""
    return AddJob(job_id=job_id, scope=Scope(user_id=user_id, agent_id=agent_id),
                  messages=[Message(role=Role.USER, content=text)], idempotency_key=key, enqueued_at=enqueued_at)


def is_utc(value: datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)


def in_two_threads(work: Callable[[int, int], T], rounds: int) -> list[T]:
    """Run ``work(round, thread)`` in threads 0 and 1 at once, `rounds` times (both start each round together).

    Returns:
        Every result (two per round); an exception in either thread fails the test.
    """
    barrier = threading.Barrier(2)
    results: list[T] = []
    errors: list[BaseException] = []

    def run(thread: int) -> None:
        try:
            for n in range(rounds):
                barrier.wait(10)
                results.append(work(n, thread))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    causes = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)] or errors
    assert not causes, f"a writer failed: {causes[0]!r} (caused by {causes[0].__cause__!r})"
    return results


# --- history -------------------------------------------------------------------------------------------


def test_history_rows_are_written_once_per_id(stores: Stores) -> None:
    # Given rows written once
    stores.history.add([row("r1"), row("r2", position=1, new_memory="y")])

    # When the same rows are written again (a retried finalize), in a batch repeating one id
    stores.history.add([row("r2", position=1, new_memory="y"), row("r1"), row("r1")])
    stores.history.add([])

    # Then each id is one row
    assert [(h.id, h.new_memory) for h in stores.history.history("m1")] == [("r1", "x"), ("r2", "y")]


def test_history_is_a_memorys_rows_oldest_first(stores: Stores) -> None:
    # Given events of two memories, written out of order; two of them at the same instant
    stores.history.add([
        row("update", event=MemoryEvent.UPDATE, created_at=T0 + timedelta(hours=1), old_memory="x", new_memory="y"),
        row("other", memory_id="m2", created_at=T0 - timedelta(days=1)),
        row("second-of-job", created_at=T0 + timedelta(hours=2), position=3, event=MemoryEvent.DELETE,
            old_memory="y", new_memory=None, is_deleted=True),
        row("add", created_at=T0),
        row("first-of-job", created_at=T0 + timedelta(hours=2), position=1, event=MemoryEvent.UPDATE,
            old_memory="y", new_memory="y2"),
    ])

    # When m1's history is read / Then only its rows, by time and then by position in the job
    assert [h.id for h in stores.history.history("m1")] == ["add", "update", "first-of-job", "second-of-job"]
    assert [h.id for h in stores.history.history("m2")] == ["other"]
    assert stores.history.history("unknown") == []


def test_delete_rows_keep_every_column(stores: Stores) -> None:
    # Given a DELETE row with every column set
    when = T0 + timedelta(minutes=5)
    stores.history.add([row("d1", event=MemoryEvent.DELETE, created_at=when, updated_at=when, old_memory="likes tea",
                            new_memory=None, is_deleted=True, actor_id="bot-1", role="assistant", job_id="job-9",
                            position=2, user_id="alice", agent_id="agent-7", run_id="run-3")])

    # When it is read back
    [item] = stores.history.history("m1")

    # Then every column round-trips
    assert item.model_dump() == {
        "id": "d1", "memory_id": "m1", "old_memory": "likes tea", "new_memory": None, "event": MemoryEvent.DELETE,
        "created_at": when, "updated_at": when, "is_deleted": True, "actor_id": "bot-1", "role": "assistant",
        "job_id": "job-9", "user_id": "alice", "agent_id": "agent-7", "run_id": "run-3"}


def test_timestamps_come_back_as_the_same_instant_in_utc(stores: Stores) -> None:
    # Given events stamped in other zones: "early" is 04:30 UTC written as 10:00 +05:30, "late" is
    # 05:00 UTC (its wall clock is earlier than early's)
    early = datetime(2024, 6, 1, 10, 0, 0, 123456, tzinfo=IST)
    late = datetime(2024, 6, 1, 5, 0, 0, tzinfo=UTC)
    stores.history.add([row("late", created_at=late), row("early", created_at=early, updated_at=early.astimezone(PST))])
    # and one without a zone (memq takes naive as UTC)
    stores.history.add([row("naive", created_at=datetime(2024, 6, 1, 6, 0))])

    # When the history is read
    items = stores.history.history("m1")

    # Then they come back in order of the instant, as aware UTC datetimes of the same instant
    assert [h.id for h in items] == ["early", "late", "naive"]
    assert [h.created_at for h in items] == [early, late, datetime(2024, 6, 1, 6, 0, tzinfo=UTC)]
    assert all(is_utc(h.created_at) for h in items)
    assert items[0].updated_at == early and is_utc(items[0].updated_at)
    assert items[1].updated_at is None


def test_job_record_timestamps_come_back_as_utc(stores: Stores) -> None:
    # Given a job enqueued at a time written in a -08:00 zone, recorded and dead-lettered
    enqueued = datetime(2024, 6, 1, 1, 2, 3, 456789, tzinfo=PST)
    before = utcnow()
    stores.records.save(job(enqueued_at=enqueued), JobState.QUEUED)
    stores.records.dead_letter(job(enqueued_at=enqueued), stage="extract", error=InvalidJob("bad"), attempts=1)

    # When they are read back
    record = stores.records.record("job-1")
    letter = stores.records.dead_letter_of("job-1")

    # Then every timestamp is aware UTC: created_at the same instant, the others the write's time
    assert record is not None and letter is not None
    assert record.created_at == enqueued and is_utc(record.created_at)
    assert is_utc(record.updated_at) and before <= record.updated_at <= utcnow()
    assert is_utc(letter.failed_at) and before <= letter.failed_at <= utcnow()


def test_unicode_and_long_text_round_trip(stores: Stores) -> None:
    # Given text with every kind of character, 100,000 characters of it, and ids at their limits
    # (128-character scope ids and 512-character idempotency keys of 4-byte characters, in indexed columns)
    long_text = (UNICODE * (100_000 // len(UNICODE) + 1))[:100_000]
    user = "𝒰" * 128
    key = "🔑" * 512
    stores.history.add([row("u1", old_memory=UNICODE, new_memory=long_text, user_id=user, actor_id=UNICODE)])
    request = job(user_id=user, key=key, text=long_text[:20_000])
    stores.records.save(request, JobState.QUEUED)
    stores.records.dead_letter(request, stage="extract", error=InvalidJob(UNICODE), attempts=2)

    # When it is read back
    [item] = stores.history.history("m1")
    record = stores.records.record("job-1")
    letter = stores.records.dead_letter_of("job-1")

    # Then it is the same text, found by its indexed key too
    assert (item.old_memory, item.new_memory, item.user_id, item.actor_id) == (UNICODE, long_text, user, UNICODE)
    assert record is not None and (record.user_id, record.idempotency_key) == (user, key)
    assert stores.records.states_by_key([(request.scope, key)]) == {(request.scope, key): "queued"}
    assert letter is not None and letter.error == UNICODE
    assert AddJob.model_validate_json(letter.request) == request


# --- job records ---------------------------------------------------------------------------------------


def test_a_job_record_follows_its_state_changes(stores: Stores) -> None:
    # Given a queued job
    request = job(agent_id="bot", key="k1")
    stores.records.save(request, JobState.QUEUED)
    first = stores.records.record("job-1")
    assert first is not None
    assert (first.status, first.stage, first.error, first.error_type) == ("queued", None, None, None)
    assert (first.user_id, first.agent_id, first.run_id, first.idempotency_key) == ("alice", "bot", None, "k1")

    # When it runs, fails a stage, then succeeds on a retry
    stores.records.save(request, JobState.RUNNING, stage="extract")
    stores.records.save(request, JobState.PARTIAL, stage="apply", error=InvalidJob("vector write failed"))
    failed = stores.records.record("job-1")
    stores.records.save(request, JobState.SUCCEEDED, stage="finalize")

    # Then one record holds the last state, the error only while there is one, and the first created_at
    assert failed is not None
    assert (failed.status, failed.stage, failed.error, failed.error_type) == (
        "partial", "apply", "vector write failed", "InvalidJob")
    last = stores.records.record("job-1")
    assert last is not None
    assert (last.status, last.stage, last.error, last.error_type) == ("succeeded", "finalize", None, None)
    assert last.created_at == T0 and first.updated_at <= failed.updated_at <= last.updated_at
    assert [r.job_id for r in stores.records.jobs()] == ["job-1"]
    assert stores.records.record("unknown") is None


def test_a_third_party_error_is_recorded_by_its_class_only(stores: Stores) -> None:
    # Given a failure whose message may quote user data / When it is recorded
    stores.records.save(job(), JobState.FAILED, stage="extract", error=ValueError("alice's secret"))

    # Then the record names the class, never the message
    record = stores.records.record("job-1")
    assert record is not None and record.error_type == "ValueError"
    assert record.error is not None and "secret" not in record.error


def test_jobs_are_listed_oldest_update_first_by_state(stores: Stores) -> None:
    # Given three jobs, updated in the order b, a, c (a fails last but one)
    for job_id in ("b", "a", "c"):
        stores.records.save(job(job_id), JobState.RUNNING, stage="extract")
    stores.records.save(job("a"), JobState.FAILED, stage="extract", error=InvalidJob("x"))

    # When they are listed / Then oldest update first, filtered by state, up to the limit
    assert [r.job_id for r in stores.records.jobs()] == ["b", "c", "a"]
    assert [r.job_id for r in stores.records.jobs(states=["running"])] == ["b", "c"]
    assert [r.job_id for r in stores.records.jobs(states=["failed", "succeeded"])] == ["a"]
    assert [r.job_id for r in stores.records.jobs(limit=1)] == ["b"]
    assert stores.records.jobs(states=["queued"]) == []


def test_states_by_key_are_per_scope_and_the_newest_job_wins(stores: Stores) -> None:
    # Given the same key in two scopes, and twice in alice's scope (a replay enqueued later)
    alice, bob = Scope(user_id="alice"), Scope(user_id="bob")
    stores.records.save(job("old", key="k"), JobState.FAILED, error=InvalidJob("x"))
    stores.records.save(job("new", key="k", enqueued_at=T0 + timedelta(seconds=1)), JobState.SUCCEEDED)
    stores.records.save(job("bobs", user_id="bob", key="k"), JobState.RUNNING)

    # When the keys are looked up / Then each scope gets its own newest job's state; unknown pairs are left out
    assert stores.records.states_by_key([(alice, "k"), (bob, "k"), (alice, "other"), (Scope(agent_id="x"), "k")]) == {
        (alice, "k"): "succeeded", (bob, "k"): "running"}
    assert stores.records.states_by_key([]) == {}


def test_states_by_key_look_up_a_large_backfill(stores: Stores) -> None:
    # Given a few recorded jobs among a backfill of 70,000 sessions (more keys than PostgreSQL takes
    # parameters in one statement)
    alice = Scope(user_id="alice")
    for n in (0, 34_999, 69_999):
        stores.records.save(job(f"job-{n}", key=f"session-{n}"), JobState.SUCCEEDED)

    # When the backfill asks which of its sessions are done
    done = stores.records.states_by_key([(alice, f"session-{n}") for n in range(70_000)])

    # Then it gets exactly the recorded ones
    assert done == {(alice, f"session-{n}"): "succeeded" for n in (0, 34_999, 69_999)}


# --- dead letters --------------------------------------------------------------------------------------


def test_dead_letters_are_kept_listed_and_removed(stores: Stores) -> None:
    # Given two failed jobs, the first one failing twice (its letter is overwritten)
    first, second = job("first"), job("second", text="other")
    stores.records.dead_letter(first, stage="extract", error=InvalidJob("bad reply"), attempts=1)
    stores.records.dead_letter(second, stage="apply", error=StoreUnavailable("qdrant down"), attempts=5)
    stores.records.dead_letter(first, stage="decide", error=InvalidJob("worse"), attempts=3)

    # When they are listed / Then one letter per job, oldest failure first, each able to rebuild its job
    letters = stores.records.dead_letters()
    assert [(d.job_id, d.stage, d.error, d.error_type, d.attempts) for d in letters] == [
        ("second", "apply", "qdrant down", "StoreUnavailable", 5), ("first", "decide", "worse", "InvalidJob", 3)]
    assert [AddJob.model_validate_json(d.request) for d in letters] == [second, first]

    # When one is removed (twice: a replay enqueued twice), and an unknown one
    stores.records.remove_dead_letter("first")
    stores.records.remove_dead_letter("first")
    stores.records.remove_dead_letter("unknown")

    # Then only the other is left
    assert [d.job_id for d in stores.records.dead_letters()] == ["second"]
    assert stores.records.dead_letter_of("first") is None


# --- concurrency ---------------------------------------------------------------------------------------


def test_two_writers_of_the_same_rows_write_each_once(stores: Stores) -> None:
    # Given two deliveries of the same work running at once (a redelivered task beside the original)
    def both(n: int, _thread: int) -> None:
        request = job(f"job-{n}", key=f"key-{n}")
        stores.history.add([row(f"r{n}-{p}", memory_id=f"m{n}", position=p, job_id=request.job_id) for p in range(5)])
        stores.records.save(request, JobState.RUNNING, stage="finalize")
        stores.records.dead_letter(request, stage="finalize", error=InvalidJob("x"), attempts=n)
        stores.records.remove_dead_letter(request.job_id)
        stores.records.dead_letter(request, stage="finalize", error=InvalidJob("x"), attempts=n)

    # When each writes the same rows, 25 times over / Then neither fails (in_two_threads checks) ...
    in_two_threads(both, rounds=25)

    # ... and every row exists once
    for n in range(25):
        assert [h.id for h in stores.history.history(f"m{n}")] == [f"r{n}-{p}" for p in range(5)]
    assert sorted(r.job_id for r in stores.records.jobs(limit=1000)) == sorted(f"job-{n}" for n in range(25))
    assert sorted(d.job_id for d in stores.records.dead_letters()) == sorted(f"job-{n}" for n in range(25))


def test_many_processes_can_open_a_fresh_database_at_once(new_database: Callable[[], str]) -> None:
    # Given workers starting together on empty databases, each worker with its own engine (connections)
    urls = [new_database() for _ in range(5)]
    engines = [[create_engine(url) for _ in range(2)] for url in urls]
    try:
        # When both create the tables at the same moment (once per database)
        opened = in_two_threads(lambda n, thread: (HistoryStore(engines[n][thread]), RecordStore(engines[n][thread])),
                                rounds=len(urls))

        # Then neither fails, and the tables work
        for history, records in opened:
            history.add([row("r1")])
            records.save(job(), JobState.QUEUED)
            assert [h.id for h in history.history("m1")] == ["r1"]
            assert records.record("job-1") is not None
    finally:
        for pair in engines:
            for engine in pair:
                engine.dispose()


# --- outages -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("postgres_server")  # skips on a laptop without PostgreSQL, fails in CI
def test_a_stopped_postgresql_is_store_unavailable_until_it_is_back() -> None:
    # Given the stores on a PostgreSQL server of their own, with a row of each kind
    with PostgresServer() as server:
        url = server.url
        history, records = open_history_store(url), RecordStore(sql_engine(url))
        try:
            history.add([row("r1")])
            records.save(job(), JobState.RUNNING)
            records.dead_letter(job(), stage="extract", error=InvalidJob("x"), attempts=1)

            # When the server stops
            server.stop()

            # Then every read and write, and opening another database, raise StoreUnavailable (retryable)
            calls: list[Callable[[], object]] = [
                lambda: history.add([row("r2")]), lambda: history.history("m1"),
                lambda: records.save(job(), JobState.SUCCEEDED), lambda: records.record("job-1"),
                lambda: records.jobs(), lambda: records.states_by_key([(Scope(user_id="alice"), "k")]),
                lambda: records.dead_letter(job(), stage="extract", error=InvalidJob("x"), attempts=2),
                lambda: records.dead_letter_of("job-1"), lambda: records.dead_letters(),
                lambda: records.remove_dead_letter("job-1"), lambda: open_history_store(server.url_of("other")),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable):
                    call()

            # When it is back (same port, same data)
            server.start()

            # Then the same stores work again and nothing was lost
            history.add([row("r2", position=1)])
            assert [h.id for h in history.history("m1")] == ["r1", "r2"]
            record = records.record("job-1")
            assert record is not None and record.status == "running"
            assert [d.job_id for d in records.dead_letters()] == ["job-1"]
        finally:
            history.engine.dispose()


def test_no_free_connection_in_the_pool_is_store_unavailable(database_url: str) -> None:
    # Given a store whose only pooled connection is busy
    engine = create_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    history, records = HistoryStore(engine), RecordStore(engine)
    try:
        with engine.connect():
            # When it reads or writes / Then it is told to retry later, not that the write is impossible
            with pytest.raises(StoreUnavailable):
                history.add([row("r1")])
            with pytest.raises(StoreUnavailable):
                records.save(job(), JobState.RUNNING)

        # And once the connection is free again, the retry works
        history.add([row("r1")])
        assert [h.id for h in history.history("m1")] == ["r1"]
    finally:
        engine.dispose()


@pytest.mark.usefixtures("postgres_server")  # skips on a laptop without PostgreSQL, fails in CI
def test_a_postgresql_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a "server" whose port accepts TCP connections (the kernel does) but never answers
    monkeypatch.setattr(history_module, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql+psycopg://memq:x@127.0.0.1:{silent.getsockname()[1]}/memq"

        # When the store is opened
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            open_history_store(url)

        # Then it gives up after the connect timeout instead of hanging the worker
        assert time.monotonic() - started < 10

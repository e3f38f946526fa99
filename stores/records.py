"""Durable job records and dead letters in SQL (the history database), through SQLModel.

Redis holds the live job record; this table keeps every job's last state for good, so a backfill can
tell exactly which sessions are done after any crash or a Redis without persistence. A dead letter
keeps what is needed to run a failed job again: its request, the stage that failed, the error and the
attempts made. Timestamps are aware UTC; every write is an upsert two deliveries can run at once.
"""

from __future__ import annotations

import threading
from datetime import datetime

from sqlalchemy import Engine, delete
from sqlmodel import Field, Session, SQLModel, col, select

from memq.errors import describe
from memq.models import AddJob, JobState, Scope, utcnow
from stores.history import UTCDateTime, create_tables, mapped_sql_errors, sql_table, upsert


_KEYS_PER_QUERY = 1_000
"""Idempotency keys looked up per query: PostgreSQL takes at most 65,535 parameters in one statement."""


class JobRecord(SQLModel, table=True):
    """A job's last known state (table ``jobs``)."""

    __tablename__ = "jobs"

    job_id: str = Field(primary_key=True)
    status: str
    stage: str | None = None
    error: str | None = None
    error_type: str | None = None
    idempotency_key: str | None = Field(default=None, index=True)
    user_id: str | None = Field(default=None, index=True)
    agent_id: str | None = None
    run_id: str | None = None
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class DeadLetter(SQLModel, table=True):
    """A failed job waiting for a replay (table ``dead_letters``)."""

    __tablename__ = "dead_letters"

    job_id: str = Field(primary_key=True)
    request: str = Field(description="The AddJob as JSON.")
    stage: str
    error: str
    error_type: str
    attempts: int
    failed_at: datetime = Field(sa_type=UTCDateTime)


class RecordStore:
    """Job records and dead letters.

    Args:
        engine: the SQLAlchemy engine of the history database (tables created on construction).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        create_tables(engine, ["jobs", "dead_letters"])

    def save(self, job: AddJob, state: JobState, *, stage: str | None = None,
             error: BaseException | None = None) -> None:
        """Insert or update the job's record (idempotent): a new record takes the job's scope, key and
        ``enqueued_at`` as ``created_at``; an existing one only its state, stage, error and ``updated_at``.

        Raises:
            StoreUnavailable: the database is unreachable or locked (retryable).
            StoreError: any other database error.
        """
        values = {"job_id": job.job_id, "status": state.value, "stage": stage,
                  "error": describe(error) if error is not None else None,
                  "error_type": type(error).__name__ if error is not None else None,
                  "idempotency_key": job.idempotency_key, "user_id": job.scope.user_id,
                  "agent_id": job.scope.agent_id, "run_id": job.scope.run_id, "created_at": job.enqueued_at,
                  "updated_at": utcnow()}
        with mapped_sql_errors("write job"), Session(self._engine) as session:
            upsert(session, sql_table(JobRecord), [values],
                   changes=["status", "stage", "error", "error_type", "updated_at"])
            session.commit()

    def states_by_key(self, requests: list[tuple[Scope, str]]) -> dict[tuple[Scope, str], str]:
        """The last state of the newest job with each idempotency key in its scope.

        Args:
            requests: ``(scope, idempotency_key)`` pairs (a key means something only inside its scope).

        Returns:
            ``{(scope, key): status}`` for the pairs that have a record.

        Raises:
            StoreUnavailable: the database is unreachable or locked (retryable).
        """
        keys = sorted({key for _, key in requests})
        if not keys:
            return {}
        rows: list[JobRecord] = []
        with mapped_sql_errors("read jobs"), Session(self._engine) as session:
            for start in range(0, len(keys), _KEYS_PER_QUERY):  # a key's rows are all in one chunk
                chunk = keys[start:start + _KEYS_PER_QUERY]
                rows += session.exec(select(JobRecord).where(col(JobRecord.idempotency_key).in_(chunk))
                                     .order_by(col(JobRecord.created_at))).all()
        found: dict[tuple[Scope, str], str] = {}
        for r in rows:
            assert r.idempotency_key is not None
            scope = Scope(user_id=r.user_id, agent_id=r.agent_id, run_id=r.run_id)
            found[(scope, r.idempotency_key)] = r.status
        return {pair: found[pair] for pair in requests if pair in found}

    def record(self, job_id: str) -> JobRecord | None:
        """The job's record, or None."""
        with mapped_sql_errors("read jobs"), Session(self._engine) as session:
            return session.get(JobRecord, job_id)

    def jobs(self, *, states: list[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Job records, oldest update first (the most likely to be stuck), optionally by state."""
        query = select(JobRecord)
        if states:
            query = query.where(col(JobRecord.status).in_(states))
        with mapped_sql_errors("read jobs"), Session(self._engine) as session:
            return list(session.exec(query.order_by(col(JobRecord.updated_at)).limit(limit)).all())

    def dead_letter_of(self, job_id: str) -> DeadLetter | None:
        """The job's dead letter, or None."""
        with mapped_sql_errors("read dead letters"), Session(self._engine) as session:
            return session.get(DeadLetter, job_id)

    def dead_letter(self, job: AddJob, *, stage: str, error: BaseException, attempts: int) -> None:
        """Keep a failed job for replay (overwrites an earlier letter of the same job)."""
        values = {"job_id": job.job_id, "request": job.model_dump_json(), "stage": stage, "error": describe(error),
                  "error_type": type(error).__name__, "attempts": attempts, "failed_at": utcnow()}
        with mapped_sql_errors("write dead letter"), Session(self._engine) as session:
            upsert(session, sql_table(DeadLetter), [values], changes=[k for k in values if k != "job_id"])
            session.commit()

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with mapped_sql_errors("read dead letters"), Session(self._engine) as session:
            return list(session.exec(select(DeadLetter).order_by(col(DeadLetter.failed_at))).all())

    def remove_dead_letter(self, job_id: str) -> None:
        """Drop a dead letter (after its replay was enqueued); nothing happens when there is none."""
        with mapped_sql_errors("delete dead letter"), Session(self._engine) as session:
            letters = sql_table(DeadLetter)
            session.connection().execute(delete(letters).where(letters.c.job_id == job_id))
            session.commit()

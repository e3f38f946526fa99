"""The job ledger: the one place that changes an add job's state, in Redis and SQL together.

Redis (`broker.jobstore.JobStore`) holds the live record, the stage outputs and the scope's order;
SQL holds what must outlast Redis: the durable job record (`stores.records`), dead letters and the
history rows of the job's memory events (`stores.history`). `JobLedger.commit` writes the SQL part
first (every write there is an idempotent upsert) and then runs the Redis script that records the
change and queues the next task, atomically. If SQL fails nothing has changed in Redis and the task
is retried; if Redis fails after SQL, the redelivered task commits again and changes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from pydantic import BaseModel

from broker.jobstore import JobMeta, JobStore
from memq.logs import set_scope_key
from memq.errors import describe
from memq.models import AddJob, JobState, utcnow
from jobs.transitions import Advance, Deferred, Finished, Joined, Retry, Skip, Transition
from memq.config import Settings
from stores.history import HistoryStore, new_sql_engine, open_history_store, sql_engine
from stores.records import RecordStore

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class JobLedger:
    """Reads and commits the state of add jobs.

    Args:
        jobs: the Redis job records (workers give it an outage budget to ride out a Redis restart).
        records: durable job records and dead letters (SQL).
        history: the history rows of memory events (SQL).
    """

    def __init__(self, jobs: JobStore, records: RecordStore, history: HistoryStore) -> None:
        self.jobs = jobs
        self.records = records
        self.history = history

    @classmethod
    def open(cls, settings: Settings, *, pooled: bool = True) -> JobLedger:
        """A ledger on the configured Redis and SQL database, with no model and no vector store (operators'
        commands, a worker's rescue sweep).

        Args:
            settings: memq settings (``history.url`` set).
            pooled: the process-wide SQL engine and history store; False: an unpooled engine of its own
                (`stores.history.new_sql_engine`), so the process keeps no SQL connection between uses.

        Raises:
            StoreUnavailable: the SQL database cannot be reached.
        """
        assert settings.history.url is not None
        store = JobStore.from_url(settings.redis.url, ttl_s=settings.jobs.ttl_s,
                                  socket_timeout_s=settings.redis.socket_timeout_s)
        if pooled:
            return cls(store, RecordStore(sql_engine(settings.history.url)), open_history_store(settings.history.url))
        engine = new_sql_engine(settings.history.url, pooled=False)
        return cls(store, RecordStore(engine), HistoryStore(engine))

    # --- reads (all raise BrokerUnavailable when Redis stays unreachable) ---------------------

    def job(self, job_id: str) -> AddJob:
        """The job's request. Raises `InvalidJob` when it is missing or does not validate."""
        return self.jobs.load_job(job_id)

    def meta(self, job_id: str) -> JobMeta:
        """State, scope and place in the scope's order (the scope key also goes on this task's structured
        log records, `memq.logs`). Raises `InvalidJob` without a record."""
        meta = self.jobs.meta(job_id)
        set_scope_key(meta.scope_key)
        return meta

    def output(self, job_id: str, stage: str, model: type[M]) -> M | None:
        """A stage's stored output, or None."""
        return self.jobs.load_stage(job_id, stage, model)

    def written(self, job_id: str) -> set[str]:
        """The job's store writes that have landed."""
        return self.jobs.written(job_id)

    def rate_limited_for(self, job_id: str) -> float:
        """Seconds the job's current stage has been rate-limited (0 at its first rate-limit, which this
        records; a finished stage starts again), for ``jobs.rate_limit_budget_s``."""
        return self.jobs.rate_limited_for(job_id)

    @contextmanager
    def computing(self, job_id: str, stage: str, *, ttl_s: float) -> Iterator[bool]:
        """Hold the lease on computing a stage while the block runs: yields False when another delivery
        of the same stage holds it (then this one must not ask the model too).

        The lease is given back when the block ends, however it ends, and lapses after `ttl_s` seconds
        if its holder died (its message is then delivered again).
        """
        token = self.jobs.lease(job_id, stage, ttl_s=ttl_s)
        try:
            yield token is not None
        finally:
            if token is not None:
                self.jobs.release(job_id, stage, token)

    # --- the one write path -------------------------------------------------------------------

    def commit(self, job_id: str, change: Transition, *, parent_id: str | None = None) -> str:
        """Record what a task run did to its job, and queue what runs next.

        Args:
            job_id: the job.
            change: the transition `jobs.add` returned.
            parent_id: the Celery id of the task that ran (Flower links the next task to it).

        Returns:
            The Redis script's answer (``"ok"``, ``"finished"`` when the job had already ended and
            nothing changed, ...) or ``"skip"``.

        Raises:
            StoreUnavailable: the SQL database is unreachable (nothing changed in Redis).
            BrokerUnavailable: Redis stayed unreachable (SQL upserts may be done; committing the
                same transition again is safe).
        """
        match change:
            case Skip(reason=reason):
                logger.debug("job %s: nothing to do (%s)", job_id, reason)
                return "skip"
            case Advance():
                if change.record is not None:
                    self.records.save(change.record, JobState.RUNNING, stage=change.stage)
                return self.jobs.step(job_id, stage=change.stage, output=change.output, marker=change.stage,
                                      then=change.then, parent_id=parent_id)
            case Deferred():
                return self.jobs.defer(job_id, decide=change.decide, backstop_s=change.backstop_s,
                                       parent_id=parent_id)
            case Joined():
                return self.jobs.join(job_id, write=change.write, output=change.output, expected=change.expected,
                                      finalize=change.finalize, parent_id=parent_id)
            case Retry():
                return self.jobs.retry(job_id, step=change.step, stage=change.stage, error=change.error,
                                       status=change.status, parent_id=parent_id)
            case Finished():
                return self._finish(job_id, change, parent_id)
        raise TypeError(f"not a transition: {type(change).__name__}")

    def _finish(self, job_id: str, change: Finished, parent_id: str | None) -> str:
        if change.history:
            self.history.add(change.history)
        if change.job is not None:
            self.records.save(change.job, change.state, stage=change.stage, error=change.error)
            if change.state is JobState.FAILED and change.error is not None:
                self.records.dead_letter(change.job, stage=change.stage, error=change.error, attempts=change.attempts)
        outcome = self.jobs.finish(job_id, change.state, results=change.results, counts=change.counts,
                                   relations=change.relations, error=change.error, stage=change.stage,
                                   then=change.then, parent_id=parent_id, images=change.images,
                                   warnings=change.warnings)
        if outcome == "ok":
            self._log(job_id, change)
        return outcome

    @staticmethod
    def _log(job_id: str, change: Finished) -> None:
        job = change.job
        waited_ms = (utcnow() - job.enqueued_at).total_seconds() * 1000 if job is not None else 0.0
        if change.state is JobState.FAILED:
            logger.warning("job %s failed in %s: %s", job_id, change.stage,
                           describe(change.error) if change.error is not None else "?")
            return
        logger.info("job %s %s events=%s images=%s warnings=%d llm_calls=%d prompt_tokens=%d duration_ms=%.0f",
                    job_id, change.state.value, change.counts, change.images or {}, len(change.warnings),
                    change.llm_calls, change.prompt_tokens, waited_ms)

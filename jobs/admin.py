"""Operators' actions on jobs: list them by state and age, end or restart a stuck one, replay dead letters.

These are for operators (the ``memq jobs`` and ``memq dlq`` commands), not for tenants: they take
job ids without a scope. Every action goes through the same atomic scripts as the workers, so it
moves the job's scope on exactly as a worker would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from jobs.ledger import JobLedger
from jobs.transitions import Finished
from memq.errors import InvalidJob, JobNotFound, PipelineError
from memq.models import AddJob, JobState


class JobEnded(PipelineError):
    """The job was ended by an operator (``memq jobs fail``)."""


@dataclass(frozen=True)
class JobRow:
    """One job as ``memq jobs`` lists it.

    Attributes:
        job_id: the job.
        status: its state (Redis's live one when Redis still has it, else SQL's last).
        stage: the stage it is in or ended in.
        age_s: seconds since it was enqueued (or first recorded).
        idle_s: seconds since its record last changed.
        waiting: what it waits for, when it waits for its scope's turn.
        error_type: the class of its error, if any.
    """

    job_id: str
    status: str
    stage: str | None
    age_s: float
    idle_s: float
    waiting: str | None
    error_type: str | None


def list_jobs(ledger: JobLedger, *, states: Sequence[str] | None = None, limit: int = 100) -> list[JobRow]:
    """Jobs by state and age, from SQL (durable) and Redis (live, including jobs not started yet).

    Args:
        ledger: the job ledger.
        states: only these states (``queued``, ``running``, ``partial``, ``succeeded``, ``failed``).
        limit: at most this many rows.

    Returns:
        Rows, the longest idle first (the most likely to be stuck).

    Raises:
        StoreUnavailable: the SQL database is unreachable.
        BrokerUnavailable: Redis is unreachable.
    """
    now = time.time()
    first_seen: dict[str, float] = dict(ledger.jobs.live(limit=limit))
    records = {r.job_id: r for r in ledger.records.jobs(states=list(states) if states else None, limit=limit)}
    ids = list(dict.fromkeys([*first_seen, *records]))
    rows: list[JobRow] = []
    for job_id, live in zip(ids, ledger.jobs.statuses(ids)):
        record = records.get(job_id)
        status = live.status.value if live is not None else (record.status if record else "unknown")
        if states and status not in states:
            continue
        created = first_seen.get(job_id) or (_epoch(record.created_at) if record else now)
        updated = _epoch(live.updated_at) if live is not None and live.updated_at else \
            (_epoch(record.updated_at) if record else created)
        rows.append(JobRow(job_id=job_id, status=status, stage=live.stage if live else (record.stage if record else None),
                           age_s=max(0.0, now - created), idle_s=max(0.0, now - updated),
                           waiting=live.waiting if live else None,
                           error_type=live.error_type if live else (record.error_type if record else None)))
    rows.sort(key=lambda r: -r.idle_s)
    return rows[:limit]


def _epoch(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _request(ledger: JobLedger, job_id: str) -> AddJob:
    """The job's request from Redis, else from its dead letter (SQL).

    Raises:
        JobNotFound: neither has it.
    """
    try:
        return ledger.job(job_id)
    except InvalidJob:
        letter = ledger.records.dead_letter_of(job_id)
        if letter is None:
            raise JobNotFound(job_id) from None
        return AddJob.model_validate_json(letter.request)


def end_job(ledger: JobLedger, job_id: str, reason: str = "ended by an operator") -> str:
    """End a job as ``failed`` (a dead letter is kept for replay) and move its scope on.

    Returns:
        ``"ok"``, or ``"finished"`` when it had already ended (nothing changed).

    Raises:
        JobNotFound: no such job.
        StoreUnavailable, BrokerUnavailable: SQL or Redis is unreachable.
    """
    job = _request(ledger, job_id)
    return ledger.commit(job_id, Finished(JobState.FAILED, job, error=JobEnded(reason), stage="operator"))


def restart_job(ledger: JobLedger, job_id: str) -> str:
    """Run a job again from its start, at the end of its scope's order; its earlier place is given up
    (so its scope moves on). Stage outputs it already has are reused. Its dead letter, if any, goes.

    Returns:
        The job id.

    Raises:
        JobNotFound: no such job.
        StoreUnavailable, BrokerUnavailable: SQL or Redis is unreachable.
    """
    job = _request(ledger, job_id)
    ledger.jobs.enqueue([job], replay=True)
    ledger.records.remove_dead_letter(job_id)
    ledger.records.save(job, JobState.QUEUED)
    return job_id


def replay_dead_letters(ledger: JobLedger, job_ids: Sequence[str] | None = None) -> list[str]:
    """Enqueue dead-lettered jobs again (all when `job_ids` is None), each at the end of its scope's order.

    The job keeps its id and every stage output it already stored (a replay after a failed decide does
    not extract again); its record goes back to ``queued``. The letter is removed once enqueued.

    Returns:
        The job ids enqueued again.

    Raises:
        JobNotFound: a requested id has no dead letter.
        StoreUnavailable, BrokerUnavailable: SQL or Redis is unreachable.
    """
    letters = {letter.job_id: letter for letter in ledger.records.dead_letters()}
    wanted = list(letters) if job_ids is None else list(job_ids)
    missing = [j for j in wanted if j not in letters]
    if missing:
        raise JobNotFound(missing[0])
    replayed: list[str] = []
    for job_id in wanted:
        job = AddJob.model_validate_json(letters[job_id].request)
        ledger.jobs.enqueue([job], replay=True)
        ledger.records.remove_dead_letter(job_id)
        ledger.records.save(job, JobState.QUEUED)
        replayed.append(job_id)
    return replayed

"""Rescue of lost jobs: queue again the next task of a job whose message a killed worker took with it.

`broker.lost` finds the jobs; this module queues their next tasks again (`JobStore.rescue`, a compare
and push: a job that changed meanwhile is left alone) and, after ``jobs.rescue_max`` rescues of the same
job, ends it as failed with `MessageLost` and a dead letter, so its scope moves on. Every task of a
job may run twice (each stage reuses a stored output, each write is fenced by the job's sequence
number), so a rescue that was not needed after all costs a duplicate delivery, never a duplicate memory.

Each worker runs `Sweeper` in a daemon thread of its main process; a Redis lock (``memq:rescue:lock``,
held for one period) lets only one of them sweep per period.
"""

from __future__ import annotations

import logging
import threading
import uuid

import redis.exceptions

from broker.lost import LostJob, LostJobs
from jobs.ledger import JobLedger
from jobs.transitions import Finished
from memq import metrics
from memq.errors import InvalidJob, MemqError, MessageLost
from memq.models import JobState

logger = logging.getLogger(__name__)

LOCK_KEY = "memq:rescue:lock"


class Sweeper:
    """Finds lost jobs and rescues them.

    Args:
        ledger: the job ledger (Redis records, SQL records and dead letters).
        quiet_s: seconds a job must have been unchanged to be looked at (``jobs.rescue_after_s``).
        most: rescues per job before it is ended (``jobs.rescue_max``).
        held_for_s: seconds after which a message held by a worker no longer counts (`broker.lost`; twice
            the visibility timeout).
        confirm_s: seconds between the two looks that must both miss the job's messages.
    """

    def __init__(self, ledger: JobLedger, *, quiet_s: float, most: int, held_for_s: float = 1800.0,
                 confirm_s: float = 1.0) -> None:
        self._ledger = ledger
        self._quiet_s = quiet_s
        self._most = most
        self._confirm_s = confirm_s
        self._lost = LostJobs(ledger.jobs.client, held_for_s=held_for_s)

    @property
    def ledger(self) -> JobLedger:
        """The job ledger it rescues through."""
        return self._ledger

    def sweep(self) -> dict[str, str]:
        """Look once: rescue every lost job, end those rescued too often.

        Returns:
            job id -> outcome: ``"rescued"``, ``"failed"`` (ended with `MessageLost`), or the script's answer
            when nothing was done (``"moved"``, ``"finished"``, ``"missing"``).

        Raises:
            redis.exceptions.RedisError, BrokerUnavailable: Redis is unreachable.
            StoreUnavailable: the SQL database is unreachable while ending a job (it is found again next time).
        """
        outcomes: dict[str, str] = {}
        for lost in self._lost.find(quiet_s=self._quiet_s, confirm_s=self._confirm_s):
            try:
                outcomes[lost.job_id] = self._rescue(lost)
            except (redis.exceptions.RedisError, MemqError) as exc:  # the others are still rescued
                logger.warning("job %s: rescue failed (%s); tried again next sweep", lost.job_id, type(exc).__name__)
                continue
            metrics.JOBS_RESCUED.labels(outcomes[lost.job_id]).inc()
        return outcomes

    def _rescue(self, lost: LostJob) -> str:
        answer = self._ledger.jobs.rescue(lost.job_id, touched=lost.touched, steps=lost.next, most=self._most)
        if answer == "ok":
            logger.warning("job %s: its next task message was lost (a worker killed while taking it?); "
                           "queued again: %s", lost.job_id, ", ".join(t.task for t in lost.next))
            return "rescued"
        if answer == "exhausted":
            return self._end(lost.job_id)
        return answer

    def _end(self, job_id: str) -> str:
        """End an exhausted job as failed (SQL record and dead letter first, as every end is committed). If
        a late delivery ended it meanwhile (the first end wins in Redis), its letter is taken back."""
        try:
            job = self._ledger.job(job_id)
        except InvalidJob:
            job = None
        error = MessageLost(f"job {job_id}: its next task message was lost and rescued {self._most} times without "
                            "progress (or none was recorded); ended so its scope moves on (`memq dlq replay`)",
                            job_id=job_id)
        outcome = self._ledger.commit(job_id, Finished(JobState.FAILED, job, error=error, stage="rescue"))
        if outcome != "ok":
            self._ledger.records.remove_dead_letter(job_id)
            status = self._ledger.jobs.statuses([job_id])[0]
            if job is not None and status is not None:
                self._ledger.records.save(job, status.status, stage=status.stage)
            return outcome
        logger.error("job %s: ended as failed (MessageLost)", job_id)
        return "failed"


def run_sweeper(sweeper: Sweeper, every_s: float, stop: threading.Event) -> None:
    """Sweep every `every_s` seconds until `stop` is set, when this process holds the period's lock.

    Errors never end the loop: Redis or SQL being down is logged and the next period tries again.
    """
    client = sweeper.ledger.jobs.client
    token = uuid.uuid4().hex
    while not stop.wait(every_s):
        try:
            if not client.set(LOCK_KEY, token, nx=True, px=max(1, int(every_s * 1000))):
                continue
            sweeper.sweep()
        except (redis.exceptions.RedisError, MemqError) as exc:
            logger.warning("rescue sweep skipped: %s", type(exc).__name__)
        except Exception:  # noqa: BLE001  (a bug here must not end the worker's sweeping for good)
            logger.exception("rescue sweep failed")


def start_sweeper(ledger: JobLedger, *, every_s: float, quiet_s: float, most: int,
                  held_for_s: float) -> threading.Event | None:
    """Start the sweep loop in a daemon thread (``memq-rescue``).

    Args:
        ledger: the job ledger.
        every_s: seconds between sweeps (0: no thread).
        quiet_s: see `Sweeper`.
        most: see `Sweeper`.
        held_for_s: see `Sweeper`.

    Returns:
        The event that stops the loop, or None when `every_s` is 0.
    """
    if every_s <= 0:
        return None
    stop = threading.Event()
    sweeper = Sweeper(ledger, quiet_s=quiet_s, most=most, held_for_s=held_for_s)
    thread = threading.Thread(target=run_sweeper, args=(sweeper, every_s, stop), name="memq-rescue", daemon=True)
    thread.start()
    return stop

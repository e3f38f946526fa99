"""Celery tasks of an add job: one per stage, each only Celery. The job's life is `jobs.add`.

A task calls its stage function, turns an error into a retry, a requeue or a failure (the policy
below), and commits the result through the ledger, which queues the next task in the same atomic
step. Tasks carry only the job id (message text never travels in task arguments).

Retry policy: `RateLimited` (no budget in the shared limiter, or the provider's 429 with or without
``Retry-After``) and `StageBusy` (another delivery is computing the stage) requeue after their wait
without counting an attempt (`jobs.add.not_now`; a stage rate-limited longer than
``jobs.rate_limit_budget_s`` fails the job with `RateLimitBudgetExceeded`); another `TransientError`
retries with exponential backoff and full jitter (2 s doubling, at most ``jobs.retry_backoff_max_s``),
or after the provider's ``Retry-After``; the
last attempt, or any other error, fails the job (dead letter, its scope moves on) and then raises
`JobFailed` so Flower shows the failure without user data. If Redis stays down longer than
``jobs.broker_outage_s``, the message is rejected for redelivery (or, if even that cannot reach
Redis, left unacknowledged, to come back after the visibility timeout): an accepted job is never
dropped.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from celery import Task
from celery.exceptions import Reject

from jobs import add
from jobs.clients import Clients
from jobs.transitions import Advance, Deferred, Finished, Joined, Retry, Skip, Transition
from broker.messages import Next
from memq import metrics
from memq.logs import task_context
from memq.config import load_settings
from memq.errors import (
    BrokerUnavailable,
    JobFailed,
    LLMUnavailable,
    NoStoreOwner,
    NotNow,
    PipelineError,
    StoreUnavailable,
    TransientError,
)
from memq.models import JobState
from workers.app import app, clients

logger = logging.getLogger(__name__)


class StageTask(Task):  # type: ignore[misc]
    """Base of memq's tasks: late acks, memq's retry policy, failures recorded before raising."""

    max_retries = 5
    retry_backoff_s = 2.0
    acks_late = True
    ignore_result = True  # results live in the job record, not the Celery result backend

    def run_life(self, job_id: str, life: Callable[[str, Clients], Transition]) -> dict[str, str]:
        """Run one stage of the job and commit what it did (see the module docstring).

        Returns:
            What happened, as Flower shows the task's result: ``{"job", "stage", "outcome"}``, the outcome
            in words (`outcome_label`): a wait for the scope's turn or for rate-limit budget is a
            succeeded task that says so, never a Celery retry.

        Raises:
            JobFailed: the job failed in this task (already recorded, dead-lettered).
            Reject: Redis stayed unreachable; the message is redelivered.
        """
        with task_context(job_id, self.name.removeprefix("memq.")):
            return self._run_life(job_id, life)

    def _run_life(self, job_id: str, life: Callable[[str, Clients], Transition]) -> dict[str, str]:
        c = clients()
        attempt = int(self.request.retries or 0)
        stage = self.name.removeprefix("memq.")
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            try:
                change = life(job_id, c)
            except BrokerUnavailable:
                raise
            except NotNow as exc:  # RateLimited (the limiter, the provider's 429), StageBusy
                change = add.not_now(job_id, c, self.name, exc, attempt=attempt)
            except NoStoreOwner:  # a reader worker while no worker owns the embedded store: wait for one
                logger.info("job %s: %s waits for the embedded vector store's owner", job_id, self.name)
                change = add.requeue(self.name, add.OWNER_WAIT_S, attempt=attempt)
            except TransientError as exc:
                change = self._retry_or_fail(job_id, c, exc, attempt)
            except Exception as exc:  # noqa: BLE001  (anything else fails the job, never silently)
                logger.debug("job %s: %s raised", job_id, self.name, exc_info=True)
                change = add.fail(job_id, c, self.name, exc, attempts=attempt + 1)
            try:
                outcome = c.ledger.commit(job_id, change, parent_id=self.request.id)
            except StoreUnavailable as exc:  # the SQL database is down: run this task again later
                change = Retry(Next(self.name, countdown_s=self._countdown(exc, attempt), retries=attempt),
                               error=exc, stage=self.name)
                outcome = c.ledger.commit(job_id, change, parent_id=self.request.id)
        except BrokerUnavailable as exc:
            logger.warning("job %s: Redis unreachable in %s; the task will be delivered again", job_id, self.name)
            raise Reject(str(exc), requeue=True) from None
        except Exception as exc:  # noqa: BLE001  (a bug or a permanent store error while recording)
            logger.debug("job %s: %s could not record its outcome", job_id, self.name, exc_info=True)
            raise PipelineError(f"job {job_id}: {self.name} could not record its outcome ({type(exc).__name__}); "
                                "see `memq jobs list`", job_id=job_id) from None
        _count(stage, change, outcome, time.perf_counter() - started)
        metrics.STAGE_CPU_SECONDS.labels(stage).observe(time.thread_time() - cpu_started)
        if isinstance(change, Finished) and change.state is JobState.FAILED and outcome == "ok":
            raise JobFailed.of(job_id, self.name, type(change.error).__name__) from None
        return {"job": job_id, "stage": stage, "outcome": outcome_label(change, outcome)}

    def _retry_or_fail(self, job_id: str, c: Clients, exc: TransientError, attempt: int) -> Transition:
        if attempt >= self.max_retries:
            return add.fail(job_id, c, self.name, exc, attempts=attempt + 1)
        logger.warning("job %s: %s will retry (%d): %s", job_id, self.name, attempt + 1, type(exc).__name__)
        return add.retry(job_id, c, self.name, exc, attempt=attempt, countdown_s=self._countdown(exc, attempt))

    def _countdown(self, exc: BaseException, attempt: int) -> float:
        """Seconds before the next attempt: the provider's Retry-After, else full-jitter backoff."""
        if isinstance(exc, LLMUnavailable) and exc.retry_after_s:
            return exc.retry_after_s
        ceiling = min(self.retry_backoff_s * 2 ** attempt, load_settings().jobs.retry_backoff_max_s)
        return random.uniform(0, ceiling)


RECORDED = frozenset({"ok", "joined", "deferred", "now"})
"""The ledger's answers for a transition it recorded (`broker.jobstore`): the step happened. The others
("skip", "done-before", "finished", "stale", "missing") mean nothing changed."""


def _count(stage: str, change: Transition, committed: str, seconds: float) -> None:
    """Record the task in memq's metrics (`memq.metrics`): its time, what it did, and a job's end."""
    metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    match change:
        case _ if committed not in RECORDED:
            kind = "skipped"
        case Deferred():
            kind = "waiting"
        case Retry() if change.error is None:
            kind = "waiting"
        case Retry():
            kind = "retry"
        case Finished() if change.state is JobState.FAILED:
            kind = "failed"
        case Finished() if change.state is JobState.PARTIAL:
            kind = "retry"  # a store write retries; the job's memories are published meanwhile
        case Skip():
            kind = "skipped"
        case _:
            kind = "done"
    metrics.STAGE_TASKS.labels(stage, kind).inc()
    if isinstance(change, Finished) and committed in RECORDED and change.state is not JobState.PARTIAL:
        metrics.JOBS.labels(change.state.value).inc()  # once per job: only its end (partial may repeat)
        if change.state is JobState.FAILED and change.job is not None:
            metrics.DEAD_LETTERS.inc()


def outcome_label(change: Transition, committed: str) -> str:
    """A task's outcome in a few words, for Flower and the task log (class names only, never user data).

    Args:
        change: what the stage asked for.
        committed: the ledger's answer (`RECORDED` ones, or ``"finished"``, ``"skip"``, ``"done-before"``
            ... when nothing changed).

    Returns:
        e.g. ``"done: extract"``, ``"waiting for the scope's turn"``, ``"waiting 2.0 s (no rate-limit budget
        or another delivery computing)"``, ``"retry 2 in 3.1 s: StoreUnavailable"``, ``"job failed:
        LLMOutputError"``, ``"nothing to do: finished"``.
    """
    if isinstance(change, Skip):
        return f"nothing to do: {change.reason}"
    if committed not in RECORDED:
        return {"skip": "nothing to do: its work was done", "done-before": "nothing to do: done before",
                "finished": "nothing to do: the job had ended", "stale": "nothing to do: already applied",
                "missing": "nothing to do: no such job"}.get(committed, f"nothing to do: {committed}")
    match change:
        case Advance():
            return f"done: {change.stage}" + (f", next {', '.join(n.task.removeprefix('memq.') for n in change.then)}"
                                              if change.then else "")
        case Deferred() if committed == "now":
            return "its scope's turn came meanwhile: decide queued at once"
        case Deferred():
            return "waiting for the scope's turn (an earlier job of the scope is not finished)"
        case Joined():
            return f"done: {change.write}"
        case Retry() if change.error is None:
            return (f"waiting {change.step.countdown_s:.1f} s (no rate-limit budget yet, another delivery computing, "
                    "or no owner of the embedded store running)")
        case Retry():
            return f"retry {change.step.retries} in {change.step.countdown_s:.1f} s: {type(change.error).__name__}"
        case Finished():
            failed = change.state is JobState.FAILED
            return f"job {change.state.value}" + (f": {type(change.error).__name__}" if failed and change.error else "")
        case Skip():
            return f"nothing to do: {change.reason}"
    return committed


class WriteTask(StageTask):
    """A store write: more attempts (a store restart should not fail the job)."""

    max_retries = 10


@app.task(name="memq.start", base=StageTask, bind=True)
def start(self: StageTask, job_id: str) -> dict[str, str]:
    """Open the job's durable record; queue caption."""
    return self.run_life(job_id, add.start)


@app.task(name="memq.caption", base=StageTask, bind=True)
def caption(self: StageTask, job_id: str) -> dict[str, str]:
    """Caption images; queue extract."""
    return self.run_life(job_id, add.caption)


@app.task(name="memq.extract", base=StageTask, bind=True)
def extract(self: StageTask, job_id: str) -> dict[str, str]:
    """Extract facts, entities and relations; queue decide."""
    return self.run_life(job_id, add.extract)


@app.task(name="memq.decide", base=StageTask, bind=True)
def decide(self: StageTask, job_id: str) -> dict[str, str]:
    """Decide events in the scope's turn; queue both store writes."""
    return self.run_life(job_id, add.decide)


@app.task(name="memq.write_vectors", base=WriteTask, bind=True)
def write_vectors(self: WriteTask, job_id: str) -> dict[str, str]:
    """Write memories and entity-name points to Qdrant; the last write to land queues finalize."""
    return self.run_life(job_id, add.write_vectors)


@app.task(name="memq.write_graph", base=WriteTask, bind=True)
def write_graph(self: WriteTask, job_id: str) -> dict[str, str]:
    """Write entities and relations to Neo4j; the last write to land queues finalize."""
    return self.run_life(job_id, add.write_graph)


@app.task(name="memq.finalize", base=StageTask, bind=True)
def finalize(self: StageTask, job_id: str) -> dict[str, str]:
    """Name points of entities the graph write deleted, history rows, result, status succeeded."""
    return self.run_life(job_id, add.finalize)

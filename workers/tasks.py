"""Thin Celery tasks, one per stage: read the job and the previous stage's output from Redis, call the
pipeline, store the output. Tasks carry only the job id (message text never travels in task arguments).

Flow: ``memq.start`` applies the Celery chain caption -> extract -> decide -> dispatch_writes; the last
link sends the store writes (vectors, graph) as separate tasks that run in parallel, and the write that
completes the set sends ``memq.finalize``. The join is a Redis set per job (`JobStore.mark_written`),
not a Celery chord: chords need a result backend subscription in the worker, and a failing store must
not keep the other store's write from landing.

Reliability (see `memq.jobstore` for the scope order):

- A stage whose output is already stored is not computed again, so a retried or redelivered task
  reuses the earlier model answer and cannot decide differently.
- ``decide`` waits (re-queued with a countdown, holding no worker slot) until every earlier job of
  its scope has finished; writes of a job whose sequence number is already applied are skipped.
- `RateLimited` (no budget in the shared limiter) re-queues with its wait and does not count as an
  attempt; other `TransientError` s retry with exponential backoff and jitter, or after the provider's
  ``Retry-After``; any other error, or the last retry, fails the job: it goes to the dead-letter store
  (`memq dlq list|replay`) and its scope moves on.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task, chain
from celery.exceptions import Retry
from pydantic import BaseModel

from memq.config import load_settings
from memq.errors import LLMUnavailable, RateLimited, StoreUnavailable, TransientError
from memq.models import AddJob, JobState, utcnow
from pipeline import apply, caption, decide, extract, finalize, graph_plan, retrieve
from pipeline.types import CaptionedMessages, ExtractedFacts, Plan, WriteResult
from stores.graph import RelationRecord
from workers.app import app, clients

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

SCOPE_WAIT_S = 0.05
"""Countdown (seconds) of a decide waiting for an earlier job of its scope, per job ahead of it
(jittered, at most `SCOPE_WAIT_MAX_S`): the tenth job in line polls less often than the next one."""
SCOPE_WAIT_MAX_S = 2.0


class StageTask(Task):  # type: ignore[misc]
    """Base of memq's tasks: late acks, retries for `TransientError`, failures to the dead-letter store."""

    max_retries = 5
    retry_backoff_s = 2.0
    acks_late = True
    ignore_result = True  # results live in the job record, not the Celery result backend

    def requeue(self, job_id: str, countdown_s: float) -> Retry:
        """Send this task (and the rest of its chain) again after `countdown_s`, not counting an attempt."""
        signature = self.signature_from_request(self.request, (job_id,), {}, countdown=countdown_s,
                                                retries=self.request.retries)
        signature.apply_async()
        return Retry(when=countdown_s, sig=signature)

    def run_stage(self, job_id: str, body: Callable[[], Any]) -> Any:
        """Run a stage body with memq's retry policy (see the module docstring)."""
        try:
            return body()
        except RateLimited as exc:
            raise self.requeue(job_id, exc.retry_after_s or 1.0) from exc
        except TransientError as exc:
            backoff_max = load_settings().jobs.retry_backoff_max_s
            wait = self.retry_backoff_s * 2 ** self.request.retries
            countdown = random.uniform(0, min(wait, backoff_max))
            if isinstance(exc, LLMUnavailable) and exc.retry_after_s:
                countdown = exc.retry_after_s
            self.on_retrying(job_id, exc)
            raise self.retry(exc=exc, countdown=countdown) from exc

    def on_retrying(self, job_id: str, exc: BaseException) -> None:
        """Hook before a counted retry (write tasks mark the job partial)."""
        logger.warning("job %s: %s will retry (%d): %s", job_id, self.name, self.request.retries + 1,
                       type(exc).__name__)

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        """Fail the job: record the error, keep a dead letter, and let its scope move on."""
        job_id = args[0] if args else kwargs.get("job_id")
        if not job_id:
            return
        logger.warning("job %s failed in %s: %s", job_id, self.name, type(exc).__name__)
        try:
            c = clients()
            c.jobs.set_state(job_id, JobState.FAILED, stage=self.name, error=exc)
            try:
                job = c.jobs.load_job(job_id)
            except Exception:  # noqa: BLE001  (an invalid stored job still fails, without a letter)
                job = None
            if job is not None and c.records is not None:
                c.records.dead_letter(job, stage=self.name, error=exc, attempts=self.request.retries + 1)
                c.records.save(job, JobState.FAILED, stage=self.name, error=exc)
            scope_key, seq = c.jobs.sequence(job_id)
            c.jobs.mark_done(scope_key, seq)
        except Exception:  # noqa: BLE001  (never raise from a failure handler; the error is logged)
            logger.exception("could not record the failure of job %s", job_id)


def _stage(job_id: str, name: str, model: type[M], compute: Callable[[AddJob], M]) -> M:
    jobs = clients().jobs
    done = jobs.load_stage(job_id, name, model)
    if done is not None:
        return done
    output = compute(jobs.load_job(job_id))
    jobs.save_stage(job_id, name, output)
    return output


def _load(job_id: str, name: str, model: type[M]) -> M:
    output = clients().jobs.load_stage(job_id, name, model)
    if output is None:
        raise RuntimeError(f"job {job_id}: stage {name!r} has no stored output")
    return output


@app.task(name="memq.start", base=StageTask, bind=True)
def start(self: StageTask, job_id: str) -> str:
    """Expand a job into its chain: caption -> extract -> decide -> dispatch_writes."""
    def body() -> str:
        c = clients()
        job = c.jobs.load_job(job_id)  # InvalidJob if the request is gone: never retried
        if c.records is not None and not c.records.states([job_id]):  # a redelivery keeps the later state
            c.records.save(job, JobState.QUEUED)
        chain(caption_task.si(job_id), extract_task.si(job_id), decide_task.si(job_id),
              dispatch_writes_task.si(job_id)).apply_async()
        return job_id
    result: str = self.run_stage(job_id, body)
    return result


@app.task(name="memq.caption", base=StageTask, bind=True)
def caption_task(self: StageTask, job_id: str) -> int:
    """Caption stage; marks the job running. Returns the number of messages."""
    def body() -> int:
        clients().jobs.set_state(job_id, JobState.RUNNING, stage="caption")
        return len(_stage(job_id, "caption", CaptionedMessages, caption.caption).messages)
    result: int = self.run_stage(job_id, body)
    return result


@app.task(name="memq.extract", base=StageTask, bind=True)
def extract_task(self: StageTask, job_id: str) -> int:
    """Extract stage (may run in parallel for many jobs of one scope). Returns the number of facts."""
    def body() -> int:
        c = clients()
        c.jobs.set_state(job_id, JobState.RUNNING, stage="extract")
        captioned = _load(job_id, "caption", CaptionedMessages)
        out = _stage(job_id, "extract", ExtractedFacts,
                     lambda job: extract.extract_facts(job, captioned, c.llm, graph=c.graph is not None))
        return len(out.facts)
    result: int = self.run_stage(job_id, body)
    return result


def _relations(job: AddJob, facts: ExtractedFacts) -> list[RelationRecord] | None:
    """Existing relations for the decider; None when graph memory is off. If Neo4j is down the job goes
    on without them (no relation can be invalidated) so that the vector write is not held up."""
    graph = clients().graph
    if graph is None:
        return None
    try:
        return graph.relations_of(job.scope, graph_plan.graph_keys(facts))
    except StoreUnavailable:
        logger.warning("job %s: Neo4j unreachable while deciding; no relation can be invalidated", job.job_id)
        return []


@app.task(name="memq.decide", base=StageTask, bind=True)
def decide_task(self: StageTask, job_id: str) -> int:
    """Retrieve neighbours and decide events, once every earlier job of the scope has finished.
    Returns the number of actions (-1 when this delivery is stale and does nothing)."""
    def body() -> int:
        c = clients()
        scope_key, seq = c.jobs.sequence(job_id)
        applied = c.jobs.applied(scope_key)
        if applied >= seq:
            logger.info("job %s: already applied in its scope; stale delivery ignored", job_id)
            return -1
        if applied < seq - 1:
            wait = min(SCOPE_WAIT_MAX_S, SCOPE_WAIT_S * (seq - 1 - applied)) * random.uniform(0.5, 1.5)
            raise RateLimited("an earlier job of the scope is not finished", retry_after_s=wait)
        c.jobs.set_state(job_id, JobState.RUNNING, stage="decide")
        facts = _load(job_id, "extract", ExtractedFacts)

        def compute(job: AddJob) -> Plan:
            near = retrieve.find_neighbours(facts.facts, job.scope, c.embedder, c.vectors,
                                            top_k=c.settings.jobs.neighbours_top_k)
            return decide.decide(job, facts, near, c.llm, c.embedder, relations=_relations(job, facts))

        return len(_stage(job_id, "decide", Plan, compute).actions)
    result: int = self.run_stage(job_id, body)
    return result


WRITES = ("write_vectors", "write_graph")
"""The store writes that run in parallel; finalize waits for all of them."""


@app.task(name="memq.dispatch_writes", base=StageTask, bind=True)
def dispatch_writes_task(self: StageTask, job_id: str) -> int:
    """Send the parallel store writes of a decided job. Returns how many were sent (0 if stale)."""
    def body() -> int:
        c = clients()
        if c.jobs.load_stage(job_id, "decide", Plan) is None:
            return 0  # a stale delivery whose decide was skipped
        c.jobs.set_state(job_id, JobState.RUNNING, stage="write")
        write_vectors_task.apply_async((job_id,))
        write_graph_task.apply_async((job_id,))
        return len(WRITES)
    result: int = self.run_stage(job_id, body)
    return result


def _stale(job_id: str) -> bool:
    """True when the job's scope has already applied it: a late duplicate must not write again."""
    jobs = clients().jobs
    scope_key, seq = jobs.sequence(job_id)
    return jobs.applied(scope_key) >= seq


def _written(job_id: str, write: str, result: WriteResult) -> dict[str, Any]:
    jobs = clients().jobs
    jobs.save_stage(job_id, write, result)
    if jobs.mark_written(job_id, write, expected=len(WRITES)) == len(WRITES):
        finalize_task.apply_async((job_id,))
    return result.model_dump()


class WriteTask(StageTask):
    """A store write: while it retries the job is ``partial``; once the vector write has landed, a
    retrying graph write does not hold back the job's memories, history, result or its scope."""

    max_retries = 10

    def on_retrying(self, job_id: str, exc: BaseException) -> None:
        """Mark the job partial (with the error); publish its result if the vectors are written."""
        super().on_retrying(job_id, exc)
        jobs = clients().jobs
        try:
            if "write_vectors" in jobs.written(job_id):
                _finalize(job_id, JobState.PARTIAL)
            jobs.set_state(job_id, JobState.PARTIAL, stage=self.name, error=exc)
        except TransientError:
            logger.exception("could not mark job %s partial", job_id)


def _timed_write(job_id: str, write: str, run: Callable[[AddJob, Plan], WriteResult]) -> dict[str, Any]:
    c = clients()
    if _stale(job_id) and write in c.jobs.written(job_id):
        cached = c.jobs.load_stage(job_id, write, WriteResult)
        return cached.model_dump() if cached else {}
    started = time.perf_counter()
    result = run(c.jobs.load_job(job_id), _load(job_id, "decide", Plan))
    result = result.model_copy(update={"duration_ms": (time.perf_counter() - started) * 1000})
    return _written(job_id, write, result)


@app.task(name="memq.write_vectors", base=WriteTask, bind=True)
def write_vectors_task(self: WriteTask, job_id: str) -> dict[str, Any]:
    """Apply the plan to Qdrant (idempotent); the last write to land sends finalize. Returns counts."""
    c = clients()
    result: dict[str, Any] = self.run_stage(job_id, lambda: _timed_write(
        job_id, "write_vectors", lambda job, plan: apply.write_vectors(job, plan, c.vectors)))
    return result


@app.task(name="memq.write_graph", base=WriteTask, bind=True)
def write_graph_task(self: WriteTask, job_id: str) -> dict[str, Any]:
    """Apply the graph change (skips while graph memory is off); the last write sends finalize."""
    c = clients()
    result: dict[str, Any] = self.run_stage(job_id, lambda: _timed_write(
        job_id, "write_graph", lambda job, plan: apply.write_graph(job, plan, c.graph, c.embedder)))
    return result


@app.task(name="memq.finalize", base=StageTask, bind=True)
def finalize_task(self: StageTask, job_id: str) -> dict[str, int]:
    """History rows, job result and status ``succeeded``; one INFO line per job. Returns event counts."""
    result: dict[str, int] = self.run_stage(job_id, lambda: _finalize(job_id, JobState.SUCCEEDED))
    return result


def _finalize(job_id: str, state: JobState) -> dict[str, int]:
    c = clients()
    job = c.jobs.load_job(job_id)
    plan = _load(job_id, "decide", Plan)
    results = finalize.finalize(job, plan, c.history)
    counts = finalize.event_counts(plan)
    relations = [{"source": r.source, "relationship": r.relationship, "destination": r.destination}
                 for r in (plan.graph.relations if plan.graph else [])]
    c.jobs.set_results(job_id, state, results, counts, relations=relations)
    if c.records is not None:
        c.records.save(job, state, stage="done" if state is JobState.SUCCEEDED else "write")
    scope_key, seq = c.jobs.sequence(job_id)
    c.jobs.mark_done(scope_key, seq)
    usage = _load(job_id, "extract", ExtractedFacts).usage + plan.usage
    logger.info("job %s %s scope=%s events=%s llm_calls=%d prompt_tokens=%d duration_ms=%.0f", job_id, state.value,
                job.scope.key(), counts, usage.calls, usage.prompt_tokens,
                (utcnow() - job.enqueued_at).total_seconds() * 1000)
    return counts

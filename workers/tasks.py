"""Thin Celery tasks, one per stage: read the job and the previous stage's output from Redis, call the
pipeline, store the output. Tasks carry only the job id (message text never travels in task arguments).

Flow: ``memq.start`` applies the Celery chain caption -> extract -> decide -> dispatch_writes; the last
link sends the store writes (vectors, graph) as separate tasks that run in parallel, and the write that
completes the set sends ``memq.finalize``. The join is a Redis set per job (`JobStore.mark_written`),
not a Celery chord: chords need a result backend subscription in the worker, and a failing store must
not keep the other store's write from landing.

A stage whose output is already stored is not computed again, so a retried or redelivered task reuses
the earlier model answer. Transient errors retry with exponential backoff and jitter; any other error,
or the last retry, marks the job ``failed`` with its error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task, chain
from pydantic import BaseModel

from memq.config import load_settings
from memq.errors import StoreUnavailable, TransientError
from memq.models import AddJob, JobState, utcnow
from pipeline import apply, caption, decide, extract, finalize, graph_plan, retrieve
from pipeline.types import CaptionedMessages, ExtractedFacts, Plan, WriteResult
from stores.graph import RelationRecord
from workers.app import app, clients

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class StageTask(Task):  # type: ignore[misc]
    """Base of memq's tasks: late acks, retries for `TransientError`, and failure recorded on the job."""

    autoretry_for = (TransientError,)
    retry_backoff = 2
    retry_backoff_max = load_settings().jobs.retry_backoff_max_s
    retry_jitter = True
    max_retries = 5
    acks_late = True
    ignore_result = True  # results live in the job record, not the Celery result backend

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        """Mark the job failed (after the last retry, or at once for a permanent error)."""
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id:
            try:
                clients().jobs.set_state(job_id, JobState.FAILED, stage=self.name, error=exc)
            except TransientError:
                logger.exception("could not record the failure of job %s", job_id)
            logger.warning("job %s failed in %s: %s", job_id, self.name, type(exc).__name__)


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
def start(self: Task, job_id: str) -> str:
    """Expand a job into its chain: caption -> extract -> decide -> dispatch_writes."""
    clients().jobs.load_job(job_id)  # InvalidJob if the request is gone: never retried
    chain(caption_task.si(job_id), extract_task.si(job_id), decide_task.si(job_id),
          dispatch_writes_task.si(job_id)).apply_async()
    return job_id


@app.task(name="memq.caption", base=StageTask, bind=True)
def caption_task(self: Task, job_id: str) -> int:
    """Caption stage; marks the job running. Returns the number of messages."""
    clients().jobs.set_state(job_id, JobState.RUNNING, stage="caption")
    return len(_stage(job_id, "caption", CaptionedMessages, caption.caption).messages)


@app.task(name="memq.extract", base=StageTask, bind=True)
def extract_task(self: Task, job_id: str) -> int:
    """Extract stage. Returns the number of facts."""
    c = clients()
    c.jobs.set_state(job_id, JobState.RUNNING, stage="extract")
    captioned = _load(job_id, "caption", CaptionedMessages)
    out = _stage(job_id, "extract", ExtractedFacts,
                 lambda job: extract.extract_facts(job, captioned, c.llm, graph=c.graph is not None))
    return len(out.facts)


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
def decide_task(self: Task, job_id: str) -> int:
    """Retrieve neighbours and decide events. Returns the number of actions."""
    c = clients()
    c.jobs.set_state(job_id, JobState.RUNNING, stage="decide")
    facts = _load(job_id, "extract", ExtractedFacts)

    def compute(job: AddJob) -> Plan:
        near = retrieve.find_neighbours(facts.facts, job.scope, c.embedder, c.vectors,
                                        top_k=c.settings.jobs.neighbours_top_k)
        return decide.decide(job, facts, near, c.llm, c.embedder, relations=_relations(job, facts))

    return len(_stage(job_id, "decide", Plan, compute).actions)


WRITES = ("write_vectors", "write_graph")
"""The store writes that run in parallel; finalize waits for all of them."""


@app.task(name="memq.dispatch_writes", base=StageTask, bind=True)
def dispatch_writes_task(self: Task, job_id: str) -> int:
    """Send the parallel store writes of a decided job. Returns how many were sent."""
    clients().jobs.set_state(job_id, JobState.RUNNING, stage="write")
    write_vectors_task.apply_async((job_id,))
    write_graph_task.apply_async((job_id,))
    return len(WRITES)


def _written(job_id: str, write: str, result: WriteResult) -> dict[str, Any]:
    jobs = clients().jobs
    jobs.save_stage(job_id, write, result)
    if jobs.mark_written(job_id, write, expected=len(WRITES)) == len(WRITES):
        finalize_task.apply_async((job_id,))
    return result.model_dump()


class WriteTask(StageTask):
    """A store write: while it retries the job is ``partial``; once the vector write has landed, a
    retrying graph write does not hold back the job's memories, history and result."""

    max_retries = 10

    def on_retry(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 einfo: Any) -> None:
        """Mark the job partial (with the error); publish its result if the vectors are written."""
        job_id = args[0]
        jobs = clients().jobs
        logger.warning("job %s: %s will retry: %s", job_id, self.name, type(exc).__name__)
        try:
            if "write_vectors" in jobs.written(job_id):
                _finalize(job_id, JobState.PARTIAL)
            jobs.set_state(job_id, JobState.PARTIAL, stage=self.name, error=exc)
        except TransientError:
            logger.exception("could not mark job %s partial", job_id)


@app.task(name="memq.write_vectors", base=WriteTask, bind=True)
def write_vectors_task(self: Task, job_id: str) -> dict[str, Any]:
    """Apply the plan to Qdrant (idempotent); the last write to land sends finalize. Returns counts."""
    c = clients()
    started = time.perf_counter()
    result = apply.write_vectors(c.jobs.load_job(job_id), _load(job_id, "decide", Plan), c.vectors)
    result = result.model_copy(update={"duration_ms": (time.perf_counter() - started) * 1000})
    return _written(job_id, "write_vectors", result)


@app.task(name="memq.write_graph", base=WriteTask, bind=True)
def write_graph_task(self: Task, job_id: str) -> dict[str, Any]:
    """Apply the graph change (skips while graph memory is off); the last write sends finalize."""
    c = clients()
    started = time.perf_counter()
    result = apply.write_graph(c.jobs.load_job(job_id), _load(job_id, "decide", Plan), c.graph, c.embedder)
    result = result.model_copy(update={"duration_ms": (time.perf_counter() - started) * 1000})
    return _written(job_id, "write_graph", result)


@app.task(name="memq.finalize", base=StageTask, bind=True)
def finalize_task(self: Task, job_id: str) -> dict[str, int]:
    """History rows, job result and status ``succeeded``; one INFO line per job. Returns event counts."""
    return _finalize(job_id, JobState.SUCCEEDED)


def _finalize(job_id: str, state: JobState) -> dict[str, int]:
    c = clients()
    job = c.jobs.load_job(job_id)
    plan = _load(job_id, "decide", Plan)
    results = finalize.finalize(job, plan, c.history)
    counts = finalize.event_counts(plan)
    relations = [{"source": r.source, "relationship": r.relationship, "destination": r.destination}
                 for r in (plan.graph.relations if plan.graph else [])]
    c.jobs.set_results(job_id, state, results, counts, relations=relations)
    usage = _load(job_id, "extract", ExtractedFacts).usage + plan.usage
    logger.info("job %s %s scope=%s events=%s llm_calls=%d prompt_tokens=%d duration_ms=%.0f", job_id, state.value,
                job.scope.key(), counts, usage.calls, usage.prompt_tokens,
                (utcnow() - job.enqueued_at).total_seconds() * 1000)
    return counts


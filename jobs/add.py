"""An add job's life, from its start message to its end, as plain functions over explicit clients.

Read this module top to bottom to follow one job: each function is one task of the job; it reads
what the earlier stages stored (through the ledger), calls the pure stage logic in `pipeline/`, and
returns what happens next as a transition (`jobs.transitions`). It changes nothing itself:
`jobs.ledger.JobLedger.commit` records the transition and queues the next task in one atomic step,
and `workers.tasks` (Celery only) turns errors into `retry`, `requeue` or `fail` transitions.

    start -> caption -> extract -> decide -> write_vectors  } -> finalize
                                     |    -> write_graph    }
                                     '-> Deferred until every earlier job of the scope has finished

An edit job (update / delete / delete_all, `memq.models.Operation`) goes from start straight to
decide, which plans it from the memories as they are in its turn (`pipeline.edit`, no model call);
the writes and finalize are the add's.

Every function is safe to run again for the same job (redelivery, duplicates): a finished job is
skipped, a stage whose output is stored reuses it (so a retried stage never asks the model twice),
two deliveries of one stage never ask the model at the same time (a lease: the second waits, then
reuses the first one's output), and writes use deterministic ids. A job's decide and writes run only in its scope's turn, and see
and touch only memories whose scope equals the job's exactly.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from broker.messages import Next
from jobs.clients import Clients
from jobs.transitions import Advance, Deferred, Finished, Joined, Retry, Skip, Transition
from memq.errors import (NoStoreOwner, NotNow, RateLimitBudgetExceeded, RateLimited, StageBusy, StoreError,
                         StoreUnavailable)
from memq.models import AddJob, JobState, Relation
from pipeline import apply, caption as caption_stage, decide as decide_stage, extract as extract_stage
from pipeline import edit as edit_stage, finalize as finalize_stage, graph_plan, packed, retrieve
from pipeline.types import CaptionedMessages, ExtractedFacts, LLMUsage, Plan, WriteResult
from stores.graph import entity_key
from stores.history import HistoryRecord

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CAPTION, EXTRACT, DECIDE = "memq.caption", "memq.extract", "memq.decide"
WRITE_VECTORS, WRITE_GRAPH, FINALIZE = "memq.write_vectors", "memq.write_graph", "memq.finalize"
WRITES = ("write_vectors", "write_graph")
"""The store writes that run in parallel; finalize waits for all of them."""

BUSY_WAIT_S = 2.0
"""Seconds a duplicate delivery waits while another delivery computes the same stage."""

OWNER_WAIT_S = 2.0
"""Seconds before a stage of a reader worker (one that does not own the embedded vector store,
`workers.app.store_role`) runs again when no owner is running (`NoStoreOwner`): it waits for the owner
without counting an attempt, so an owner's restart, however long, fails no job."""

SCOPE_WAIT_BASE_S = 1.0
"""Backstop wait (seconds) of a decide waiting for its scope's turn, per job ahead of it in the scope;
it doubles with every wait, up to ``jobs.scope_wait_max_s``. The decide is normally woken earlier,
when the job before it ends: the backstop only covers a lost wake-up. Scaling it by the jobs ahead
(a job's turn comes no sooner than one decide per job ahead) cut the backstop copies that fired
only to wait again: at 16 threads over 100 LoCoMo adds (10 scopes) they were ~3 per job, each a
task run, a Redis script and a held ETA message (`bench/vs_mem0.py`, 2026-11-22)."""


def start(job_id: str, c: Clients) -> Transition:
    """Open the job's durable record and queue its caption stage.

    Raises:
        InvalidJob: the request is missing or does not validate (never retried).
    """
    job = c.ledger.job(job_id)
    if c.ledger.meta(job_id).finished:
        return Skip("finished")
    return Advance("start", None, (Next(DECIDE if job.is_edit else CAPTION),), record=job)


def caption(job_id: str, c: Clients) -> Transition:
    """Images in messages become text (`pipeline.caption`): supplied captions, the shared caption cache,
    then one vision call for the job's remaining images; then extract.

    Raises:
        LLMUnavailable, RateLimited, LLMOutputError: from the vision model.
        StageBusy: another delivery of this stage, or another job's caption of the same image, is
            being computed (re-queued, not an attempt).
    """
    if c.ledger.meta(job_id).finished:
        return Skip("finished")
    out = c.ledger.output(job_id, "caption", CaptionedMessages)
    if out is None:
        job = c.ledger.job(job_id)

        batch_s = _caption_batch_s(c)

        def run() -> CaptionedMessages:
            return caption_stage.caption(job, vision=c.vision, cache=c.captions, settings=c.settings.vision,
                                         fetch=c.fetch, lease_s=batch_s)

        if not caption_stage.needs_model(job, c.vision):
            out = run()
        else:
            batches = -(-c.settings.limits.max_images // c.settings.vision.max_images_per_call)
            stage_s = min(batches * batch_s, float(c.settings.redis.visibility_timeout_s))
            with c.ledger.computing(job_id, "caption", ttl_s=stage_s) as mine:
                if not mine:
                    raise StageBusy("another delivery is captioning", retry_after_s=BUSY_WAIT_S, job_id=job_id)
                out = run()
    return Advance("caption", out, (Next(EXTRACT),))


def extract(job_id: str, c: Clients) -> Transition:
    """Facts (and, with graph memory, entities and relations) from the messages, in one model call.

    Extraction may run in parallel for many jobs of one scope; only decide waits for its turn.

    Raises:
        LLMUnavailable, RateLimited, LLMOutputError, InvalidJob: from the model call.
        StageBusy: another delivery of this stage is computing it (re-queued, not an attempt).
    """
    if c.ledger.meta(job_id).finished:
        return Skip("finished")
    out = c.ledger.output(job_id, "extract", ExtractedFacts)
    if out is None:
        with c.ledger.computing(job_id, "extract", ttl_s=_lease_s(c)) as mine:
            if not mine:
                raise StageBusy("another delivery is extracting", retry_after_s=BUSY_WAIT_S, job_id=job_id)
            captioned = _stored(c, job_id, "caption", CaptionedMessages)
            out = extract_stage.extract_facts(c.ledger.job(job_id), captioned, c.llm, graph=c.graph is not None,
                                              instructions=c.settings.prompts.fact_extraction,
                                              temporal=c.settings.pipeline.temporal_grounding)
            out = _embedded(c, job_id, out)
    return Advance("extract", out, (Next(DECIDE),))


def _embedded(c: Clients, job_id: str, out: ExtractedFacts) -> ExtractedFacts:
    """`out` with its facts' (and graph names') vectors packed in, embedded now, outside the scope's turn.

    A scope's decides run one at a time while its extracts run side by side, so an embedding here is
    off the scope's critical path: over 100 LoCoMo sessions at 16 threads (`bench/vs_mem0.py`), the
    decide stage spent about as long embedding its ~26 facts as in its model call. If the embedder
    fails (a hosted one throttled or down), the output goes on without vectors and the decide stage
    embeds them as before: the extraction's model call is never repeated for an embedding.
    """
    texts = [f.text for f in out.facts] + (list(graph_plan.graph_names(out).values()) if c.graph is not None else [])
    if not texts:
        return out
    try:
        vectors = c.embedder.embed(texts)
    except Exception as exc:  # noqa: BLE001  (decide embeds them again and raises what it must)
        logger.warning("job %s: embedding its facts at extraction failed (%s); decide will embed them",
                       job_id, type(exc).__name__)
        return out
    return out.model_copy(update={"vectors": packed.pack(vectors)})


def _vectors_of(c: Clients, facts: ExtractedFacts) -> tuple[list[list[float]] | None, dict[str, list[float]]]:
    """The facts' vectors and the graph names' (by entity key) that the extract stage packed, or
    ``(None, {})`` when it did not (an output written before memq packed them, or an embedder failure)."""
    if not facts.vectors:
        return None, {}
    keys = list(graph_plan.graph_names(facts)) if c.graph is not None else []
    try:
        rows = packed.unpack(facts.vectors, len(facts.facts) + len(keys))
    except ValueError:
        return None, {}
    if rows and len(rows[0]) != c.embedder.dims:  # another embedder's vectors (the setting changed)
        return None, {}
    return rows[:len(facts.facts)], dict(zip(keys, rows[len(facts.facts):]))


def decide(job_id: str, c: Clients) -> Transition:
    """ADD / UPDATE / DELETE / NONE for the job's facts, once every earlier job of its scope has ended;
    then both store writes, in parallel.

    Neighbours are the memories whose scope equals the job's exactly (a job of ``agent_id=bot``
    never sees, and so never changes, ``user_id=carol, agent_id=bot``'s memories).

    Raises:
        LLMUnavailable, RateLimited, LLMOutputError: from the model call.
        StoreUnavailable: Qdrant is unreachable.
        StageBusy: another delivery of this stage is computing it (re-queued, not an attempt).
    """
    meta = c.ledger.meta(job_id)
    if meta.finished or meta.stale:
        return Skip("finished" if meta.finished else "already applied")
    if not meta.turn:
        ahead = max(1, meta.seq - 1 - meta.applied)
        wait_s = min(c.settings.jobs.scope_wait_max_s, SCOPE_WAIT_BASE_S * ahead * 2 ** min(meta.deferrals, 16))
        return Deferred(Next(DECIDE), backstop_s=wait_s * random.uniform(0.8, 1.2))
    plan = c.ledger.output(job_id, "decide", Plan)
    if plan is None:
        with c.ledger.computing(job_id, "decide", ttl_s=_lease_s(c)) as mine:
            if not mine:
                raise StageBusy("another delivery is deciding", retry_after_s=BUSY_WAIT_S, job_id=job_id)
            job = c.ledger.job(job_id)
            plan = edit_stage.plan_edit(job, c.vectors, c.embedder) if job.is_edit else _decided(c, job)
    return Advance("decide", plan, (Next(WRITE_VECTORS), Next(WRITE_GRAPH)))


def _decided(c: Clients, job: AddJob) -> Plan:
    """An add's plan: its facts against their nearest memories of exactly its scope, by the model."""
    facts = _stored(c, job.job_id, "extract", ExtractedFacts)
    relations, new_names = _graph_context(c, job, facts)
    fact_vectors, name_vectors = _vectors_of(c, facts)
    missing = {k: n for k, n in new_names.items() if k not in name_vectors}
    near = retrieve.find_neighbours(facts.facts, job.scope, c.embedder, c.vectors,
                                    top_k=c.settings.jobs.neighbours_top_k, names=list(missing.values()),
                                    fact_vectors=fact_vectors)
    plan = decide_stage.decide(job, facts, near, c.llm, c.embedder, relations=relations,
                               instructions=c.settings.prompts.update_memory)
    name_vectors.update(zip(missing, near.name_vectors))
    if plan.graph is None or not new_names:
        return plan
    planned = {entity_key(e.name) for e in plan.graph.entities}
    embeddings = {k: name_vectors[k] for k in new_names if k in planned and k in name_vectors}
    return plan.model_copy(update={"graph": plan.graph.model_copy(update={"embeddings": embeddings})})


def write_vectors(job_id: str, c: Clients) -> Transition:
    """Apply the plan to Qdrant (idempotent upserts and deletes, only in the job's exact scope), and its
    entity-name points to the entity-name collection with graph memory on.

    Raises:
        StoreUnavailable: Qdrant is unreachable (retried; the job is ``partial`` meanwhile).
        LLMUnavailable: a hosted embedder is unavailable for a name the plan took for embedded that is
            not (rare; retried).
    """
    return _write(job_id, c, "write_vectors",
                  lambda: apply.write_vectors(*_job_and_plan(c, job_id), c.vectors, c.graph, c.embedder))


def write_graph(job_id: str, c: Clients) -> Transition:
    """Apply the plan's graph change to Neo4j; the entity-name points are the vector write's. While graph
    memory is off the write joins as skipped without reading the job or its plan (measured: 1.0 against
    2.7 ms of the task thread's CPU, median of 104 jobs).

    Raises:
        StoreUnavailable: Neo4j is unreachable (retried; once the vectors are in, the job is
            ``partial`` with its memories published, and its scope moves on).
    """
    if c.graph is None:  # graph memory off: the job joins without reading its record and plan
        return _write(job_id, c, "write_graph", lambda: WriteResult(store="neo4j", skipped=True))
    return _write(job_id, c, "write_graph", lambda: apply.write_graph(*_job_and_plan(c, job_id), c.graph))


def finalize(job_id: str, c: Clients) -> Transition:
    """The name points of entities the graph write's forgetting deleted go, if those entities are still
    gone (now that the vector write, which writes name points, has landed too); then history rows, the
    job's result in Mem0's shape, status ``succeeded``; its scope moves on.

    Removing those points is best effort: with Neo4j or the vector store unreachable it is logged and
    skipped (graph search finds no entity behind a point left over; it only takes one of the query's
    nearest-name slots), and the job still ends.
    """
    if c.ledger.meta(job_id).finished:
        return Skip("finished")
    _forget_names(c, job_id)
    return _published(job_id, c, JobState.SUCCEEDED)


def _forget_names(c: Clients, job_id: str) -> None:
    graph = c.ledger.output(job_id, "write_graph", WriteResult)
    if graph is None or not graph.forgotten_entities or c.graph is None:
        return
    try:
        c.graph.forget_names(c.ledger.job(job_id).scope, graph.forgotten_entities)
    except (StoreUnavailable, StoreError) as exc:
        logger.warning("job %s: name points of %d deleted entities left in place (%s: %s)", job_id,
                       len(graph.forgotten_entities), type(exc).__name__, exc)


# --- what the worker's error handling asks for ---------------------------------------------------

def retry(job_id: str, c: Clients, task: str, error: BaseException, *, attempt: int, countdown_s: float) -> Transition:
    """Run `task` again after `countdown_s` seconds, as attempt `attempt` + 1.

    A store write that retries makes the job ``partial``; if the vectors have already landed, the
    job's memories, history and result are published now and its scope moves on, so a Neo4j outage
    never holds back the job's memories or the next jobs of its scope.
    """
    step = Next(task, countdown_s=countdown_s, retries=attempt + 1)
    if task not in (WRITE_VECTORS, WRITE_GRAPH):
        return Retry(step, error=error, stage=task)
    if "write_vectors" in c.ledger.written(job_id):
        return _published(job_id, c, JobState.PARTIAL, error=error, stage=task, then=step)
    return Retry(step, error=error, stage=task, status=JobState.PARTIAL)


def requeue(task: str, wait_s: float, *, attempt: int) -> Transition:
    """Run `task` again after `wait_s` seconds without counting an attempt (the shared rate limiter
    had no budget yet, or another delivery is computing the stage)."""
    return Retry(Next(task, countdown_s=wait_s, retries=attempt))


def not_now(job_id: str, c: Clients, task: str, error: NotNow, *, attempt: int) -> Transition:
    """A stage that cannot run now (`NotNow`) runs again after its wait, without counting an attempt:
    another delivery is computing it (`StageBusy`), or the model has no room (`RateLimited`: the shared
    limiter's budget, or the provider's 429, with or without ``Retry-After``).

    Rate limits end a job only by time: once its stage has been rate-limited for longer than
    ``jobs.rate_limit_budget_s`` since its first rate-limit (a finished stage starts the clock again),
    the job fails with `RateLimitBudgetExceeded` and a dead letter.

    Raises:
        BrokerUnavailable: Redis stayed unreachable.
    """
    if isinstance(error, RateLimited):
        waited_s, budget_s = c.ledger.rate_limited_for(job_id), c.settings.jobs.rate_limit_budget_s
        if waited_s > budget_s:
            over = RateLimitBudgetExceeded(
                f"{task} rate-limited for {waited_s:.0f} s, over its budget of {budget_s:.0f} s "
                f"(MEMQ_JOBS__RATE_LIMIT_BUDGET_S); last: {type(error.__cause__ or error).__name__}",
                waited_s=waited_s, budget_s=budget_s, job_id=job_id)
            return fail(job_id, c, task, over, attempts=attempt + 1)
    return requeue(task, error.retry_after_s or 1.0, attempt=attempt)


def fail(job_id: str, c: Clients, task: str, error: BaseException, *, attempts: int) -> Transition:
    """End the job as ``failed``: its error recorded, a dead letter kept for replay, its scope moved on.

    If its vector write had already landed (the graph write failed for good), the history rows of what
    it did to the points are written too, so the audit trail never misses a change that happened.
    """
    try:
        job: AddJob | None = c.ledger.job(job_id)
    except Exception:  # noqa: BLE001  (a job whose request is gone or invalid still fails, without a letter)
        job = None
    history: tuple[HistoryRecord, ...] = ()
    if job is not None and task == WRITE_GRAPH and "write_vectors" in c.ledger.written(job_id):
        plan = c.ledger.output(job_id, "decide", Plan)
        history = tuple(finalize_stage.history_rows(job, plan)) if plan is not None else ()
    return Finished(JobState.FAILED, job, error=error, stage=task, attempts=attempts, history=history)


# --- helpers ------------------------------------------------------------------------------------

def _lease_s(c: Clients) -> float:
    """How long a stage's compute lease lives if its holder dies: a model call with its in-call retries
    (3 tries of ``llm.timeout_s``), but never longer than the visibility timeout, after which a dead
    holder's message is delivered again and must be able to compute."""
    return min(4 * c.settings.llm.timeout_s + 30, float(c.settings.redis.visibility_timeout_s))



def _caption_batch_s(c: Clients) -> float:
    """How long one batch of the caption stage may take if its holder dies: its downloads (with
    ``vision.fetch``) and one vision call with its in-call retries; never past the visibility timeout."""
    v = c.settings.vision
    fetching = v.max_images_per_call * v.fetch_timeout_s if v.fetch else 0.0
    return min(4 * v.timeout_s + fetching + 30, float(c.settings.redis.visibility_timeout_s))


def _stored(c: Clients, job_id: str, stage: str, model: type[M]) -> M:
    out = c.ledger.output(job_id, stage, model)
    if out is None:
        raise RuntimeError(f"job {job_id}: stage {stage!r} has no stored output")
    return out


def _graph_context(c: Clients, job: AddJob, facts: ExtractedFacts) -> tuple[list[Relation] | None, dict[str, str]]:
    """Existing relations for the decider (None when graph memory is off) and the job's entity names
    the scope's graph has no embedding for yet (key -> name: embedded in the batch of the facts). If
    Neo4j is down the job goes on without relations (no relation can be invalidated) so that the vector
    write is not held up, and every name is embedded."""
    if c.graph is None:
        return None, {}
    names = graph_plan.graph_names(facts)
    try:
        relations = c.graph.relations_of(job.scope, sorted(names))
        embedded = c.graph.embedded_keys(job.scope, sorted(names))
    except NoStoreOwner:
        raise  # a reader worker with no owner running: the whole decide waits for it (workers.tasks)
    except StoreUnavailable as exc:
        logger.warning("job %s: the graph store (Neo4j or its entity names) unreachable while deciding (%s); no "
                       "relation can be invalidated", job.job_id, type(exc).__name__)
        return [], names
    return relations, {k: n for k, n in names.items() if k not in embedded}


def _write(job_id: str, c: Clients, write: str, run: Callable[[], WriteResult]) -> Transition:
    meta = c.ledger.meta(job_id)
    if meta.finished:
        return Skip("finished")
    done = c.ledger.output(job_id, write, WriteResult)
    if done is not None:  # landed before (a redelivery, or a replayed job): join again, idempotently
        return Joined(write, done, expected=len(WRITES), finalize=Next(FINALIZE))
    if meta.stale and write == "write_vectors":
        return Skip("already applied")
    started = time.perf_counter()
    result = run()
    result = result.model_copy(update={"duration_ms": (time.perf_counter() - started) * 1000})
    return Joined(write, result, expected=len(WRITES), finalize=Next(FINALIZE))


def _job_and_plan(c: Clients, job_id: str) -> tuple[AddJob, Plan]:
    return c.ledger.job(job_id), _stored_plan(c, job_id)


def _stored_plan(c: Clients, job_id: str) -> Plan:
    return _stored(c, job_id, "decide", Plan)


def _published(job_id: str, c: Clients, state: JobState, *, error: BaseException | None = None,
               stage: str = "done", then: Next | None = None) -> Finished:
    """The job's events published: history rows, results, counts, relations (succeeded or partial)."""
    job = c.ledger.job(job_id)
    plan = _stored_plan(c, job_id)
    extracted = c.ledger.output(job_id, "extract", ExtractedFacts)
    captioned = c.ledger.output(job_id, "caption", CaptionedMessages)
    usage = ((captioned.usage if captioned is not None else LLMUsage())
             + (extracted.usage if extracted is not None else LLMUsage()) + plan.usage)
    relations: list[dict[str, str | bool]] = [
        {**r.triple()} for r in (plan.graph.relations if plan.graph else [])]
    relations += [{**r.triple(), "valid": False} for r in (plan.graph.invalidated_relations if plan.graph else [])]
    return Finished(state, job, results=finalize_stage.results(plan), counts=finalize_stage.event_counts(plan),
                    relations=relations, history=finalize_stage.history_rows(job, plan), error=error,
                    stage=stage if state is JobState.PARTIAL else "done", then=then, llm_calls=usage.calls,
                    prompt_tokens=usage.prompt_tokens,
                    images=captioned.images.as_dict() if captioned is not None else {},
                    warnings=(*(captioned.warnings if captioned is not None else ()),
                              *(f"memory {m} not found in the job's scope" for m in plan.missing)))

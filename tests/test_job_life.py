"""An add job's life driven by hand, without Celery: each function of `jobs.add` returns what runs next,
and the ledger commits it. The ledger here routes every task to a queue no worker reads, so nothing
but the test moves the job."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from jobs import add
from jobs.clients import Clients
from jobs.transitions import Advance, Deferred, Finished, Joined, Retry, Skip
from memq.config import Settings
from memq.errors import RateLimited, RateLimitBudgetExceeded, StageBusy, StoreUnavailable
from memq.models import JobState, MemoryEvent
from pipeline import packed
from pipeline.types import ExtractedFacts, Plan
from producer import Producer
from tests.helpers import PARKED, by_hand_clients

@pytest.fixture()
def by_hand(settings: Settings, worker: Any) -> Iterator[Clients]:
    """The session's clients with a ledger whose messages all go to `PARKED`."""
    c = by_hand_clients(settings)
    yield c
    c.ledger.jobs.client.delete(PARKED)


def _enqueue(c: Clients, settings: Settings, text: str, user_id: str) -> str:
    [(job_id, _)] = c.ledger.jobs.enqueue([Producer(settings).build(text, user_id=user_id, infer=False)])
    return job_id


def test_each_stage_returns_what_runs_next_and_a_finished_job_skips_them_all(
        by_hand: Clients, settings: Settings, memories: Any, user_id: str) -> None:
    job_id = _enqueue(by_hand, settings, "Hana teaches piano on Mondays.", user_id)
    # When the stages run in order, each committed by hand
    for life, then in ((add.start, ["memq.caption"]), (add.caption, ["memq.extract"]),
                       (add.extract, ["memq.decide"]), (add.decide, ["memq.write_vectors", "memq.write_graph"])):
        step = life(job_id, by_hand)
        # Then each says which tasks follow
        assert isinstance(step, Advance) and [n.task for n in step.then] == then, step
        assert by_hand.ledger.commit(job_id, step) == "ok"
    for write in (add.write_vectors, add.write_graph):
        joined = write(job_id, by_hand)
        assert isinstance(joined, Joined)
        by_hand.ledger.commit(job_id, joined)
    done = add.finalize(job_id, by_hand)
    assert isinstance(done, Finished) and done.state is JobState.SUCCEEDED
    assert [r.event for r in done.results or []] == [MemoryEvent.ADD]
    by_hand.ledger.commit(job_id, done)
    # And the job is succeeded, its memory stored
    assert by_hand.ledger.jobs.status(job_id).status is JobState.SUCCEEDED
    assert [m["memory"] for m in memories.get_all(user_id=user_id)["results"]] == ["Hana teaches piano on Mondays."]
    # And every stage delivered again is skipped
    for life in (add.start, add.caption, add.extract, add.decide, add.write_vectors, add.write_graph, add.finalize):
        assert isinstance(life(job_id, by_hand), Skip)


def test_decide_is_deferred_until_the_earlier_job_of_the_scope_has_ended(
        by_hand: Clients, settings: Settings, user_id: str) -> None:
    first = _enqueue(by_hand, settings, "Ivo runs marathons.", user_id)
    second = _enqueue(by_hand, settings, "Ivo runs ultramarathons too.", user_id)
    for life in (add.start, add.caption, add.extract):
        by_hand.ledger.commit(second, life(second, by_hand))
    # When the later job reaches decide while the first has not ended
    waiting = add.decide(second, by_hand)
    # Then it is deferred (a scope's order, not a rate limit), and the ledger parks it
    assert isinstance(waiting, Deferred) and waiting.decide.task == "memq.decide"
    assert by_hand.ledger.commit(second, waiting) == "deferred"
    assert first in (by_hand.ledger.jobs.status(second).waiting or "")
    # When the first job ends (here: failed by an operator), Then the later one's turn has come
    by_hand.ledger.commit(first, add.fail(first, by_hand, "memq.start", StoreUnavailable("test"), attempts=1))
    assert isinstance(add.decide(second, by_hand), Advance)


def test_a_store_write_that_retries_after_the_vectors_landed_publishes_the_job_as_partial(
        by_hand: Clients, settings: Settings, user_id: str) -> None:
    job_id = _enqueue(by_hand, settings, "Jun grows bonsai trees.", user_id)
    for life in (add.start, add.caption, add.extract, add.decide, add.write_vectors):
        by_hand.ledger.commit(job_id, life(job_id, by_hand))
    # When the graph write fails with a transient error after the vectors landed
    step = add.retry(job_id, by_hand, "memq.write_graph", StoreUnavailable("Neo4j down"), attempt=0, countdown_s=5)
    # Then the job is published as partial (its memories, history and result) and the write retried
    assert isinstance(step, Finished) and step.state is JobState.PARTIAL and step.then is not None
    assert step.then.task == "memq.write_graph" and step.then.retries == 1 and step.results
    by_hand.ledger.commit(job_id, step)
    assert by_hand.ledger.jobs.status(job_id).status is JobState.PARTIAL
    # And another stage's transient error is a plain retry, counted
    other = add.retry(job_id, by_hand, "memq.extract", StoreUnavailable("x"), attempt=2, countdown_s=1)
    assert isinstance(other, Retry) and other.step.retries == 3


def test_a_stages_rate_limit_clock_starts_at_its_first_rate_limit_and_only_its_budget_ends_the_job(
        by_hand: Clients, settings: Settings, user_id: str) -> None:
    job_id = _enqueue(by_hand, settings, "Lea keeps honeybees.", user_id)
    by_hand.ledger.commit(job_id, add.start(job_id, by_hand))
    record = by_hand.ledger.jobs.client

    # When its caption stage is rate-limited (attempt 3 of the stage)
    step = add.not_now(job_id, by_hand, "memq.caption", RateLimited("no budget", retry_after_s=2.0), attempt=3)
    # Then it is a requeue after the wait that keeps the attempt number, and the stage's clock has started
    assert isinstance(step, Retry) and step.error is None
    assert (step.step.task, step.step.countdown_s, step.step.retries) == ("memq.caption", 2.0, 3)
    assert record.hget(f"memq:job:{job_id}", "rate_limited_since") is not None
    # And another delivery computing the stage is a requeue that starts no clock
    record.hdel(f"memq:job:{job_id}", "rate_limited_since")
    busy = add.not_now(job_id, by_hand, "memq.caption", StageBusy("busy", retry_after_s=2.0), attempt=0)
    assert isinstance(busy, Retry) and record.hget(f"memq:job:{job_id}", "rate_limited_since") is None

    # When the stage is rate-limited and then finishes
    add.not_now(job_id, by_hand, "memq.caption", RateLimited("no budget", retry_after_s=1.0), attempt=0)
    by_hand.ledger.commit(job_id, add.caption(job_id, by_hand))
    # Then its clock is gone: the next stage starts its own
    assert record.hget(f"memq:job:{job_id}", "rate_limited_since") is None

    # When the next stage stays rate-limited past a budget (here a microsecond)
    tight = settings.jobs.model_copy(update={"rate_limit_budget_s": 1e-6})
    c = dataclasses.replace(by_hand, settings=settings.model_copy(update={"jobs": tight}))
    first = add.not_now(job_id, c, "memq.extract", RateLimited("no budget", retry_after_s=1.0), attempt=0)
    assert isinstance(first, Retry)
    over = add.not_now(job_id, c, "memq.extract", RateLimited("no budget", retry_after_s=1.0), attempt=0)
    # Then the job fails with RateLimitBudgetExceeded, and a dead letter keeps it
    assert isinstance(over, Finished) and over.state is JobState.FAILED
    assert isinstance(over.error, RateLimitBudgetExceeded) and over.error.waited_s > over.error.budget_s
    by_hand.ledger.commit(job_id, over)
    assert by_hand.ledger.jobs.status(job_id).error_type == "RateLimitBudgetExceeded"
    assert job_id in {d.job_id for d in by_hand.records.dead_letters()}


def test_with_graph_memory_off_the_graph_write_joins_as_skipped_without_reading_the_plan(
        by_hand: Clients, settings: Settings, user_id: str) -> None:
    from pydantic import ValidationError

    from broker.jobstore import _key
    from pipeline.types import WriteResult

    job_id = _enqueue(by_hand, settings, "Noor restores old bicycles.", user_id)
    for life in (add.start, add.caption, add.extract, add.decide):
        assert by_hand.ledger.commit(job_id, life(job_id, by_hand)) == "ok"
    # Given a worker with graph memory off, and a stored plan no stage could read any more
    off = dataclasses.replace(by_hand, graph=None)
    by_hand.ledger.jobs.client.set(f"{_key(job_id)}:stage:decide", "not a plan")
    # When its graph write runs, Then it joins as skipped: it did not read the plan
    joined = add.write_graph(job_id, off)
    assert isinstance(joined, Joined) and joined.write == "write_graph" and joined.expected == 2
    assert isinstance(joined.output, WriteResult) and joined.output.skipped and joined.output.store == "neo4j"
    # And the vector write, which needs the plan, does read it
    with pytest.raises(ValidationError):
        add.write_vectors(job_id, off)


def test_a_replayed_job_whose_vectors_had_landed_joins_again_and_succeeds(
        by_hand: Clients, settings: Settings, memories: Any, user_id: str) -> None:
    from jobs.admin import replay_dead_letters

    job_id = _enqueue(by_hand, settings, "Kai builds wooden boats.", user_id)
    for life in (add.start, add.caption, add.extract, add.decide, add.write_vectors):
        by_hand.ledger.commit(job_id, life(job_id, by_hand))
    # Given the job failed for good in its graph write, after its vectors landed
    by_hand.ledger.commit(job_id, add.fail(job_id, by_hand, "memq.write_graph", StoreUnavailable("down"), attempts=11))
    assert by_hand.ledger.jobs.status(job_id).status is JobState.FAILED
    # When its dead letter is replayed and it runs again
    assert replay_dead_letters(by_hand.ledger, [job_id]) == [job_id]
    for life in (add.start, add.caption, add.extract, add.decide):
        assert isinstance(step := life(job_id, by_hand), Advance), step
        by_hand.ledger.commit(job_id, step)
    # Then the write that had landed joins again (it is not written twice), and the job succeeds
    again = add.write_vectors(job_id, by_hand)
    assert isinstance(again, Joined)
    by_hand.ledger.commit(job_id, again)
    by_hand.ledger.commit(job_id, add.write_graph(job_id, by_hand))
    done = add.finalize(job_id, by_hand)
    assert isinstance(done, Finished) and done.state is JobState.SUCCEEDED
    by_hand.ledger.commit(job_id, done)
    assert by_hand.ledger.jobs.status(job_id).status is JobState.SUCCEEDED
    assert len(memories.get_all(user_id=user_id)["results"]) == 1


def test_the_deployments_prompts_replace_the_built_in_instructions(
        by_hand: Clients, settings: Settings, llm_server: Any, user_id: str) -> None:
    from pipeline import decide as decide_stage, extract as extract_stage
    from tests.helpers import facts_reply

    prompts = settings.prompts.model_copy(update={"fact_extraction": "Only keep facts about music.",
                                                  "update_memory": "Never delete a memory about music."})
    c = dataclasses.replace(by_hand, settings=settings.model_copy(update={"prompts": prompts}))
    # Given a memory of the scope, so that decide asks the model
    earlier = _enqueue(c, settings, "Jun plays the cello.", user_id)
    for life in (add.start, add.caption, add.extract, add.decide, add.write_vectors, add.write_graph, add.finalize):
        c.ledger.commit(earlier, life(earlier, c))
    [(job_id, _)] = c.ledger.jobs.enqueue([Producer(settings).build("Jun plays the cello every day.",
                                                                      user_id=user_id)])
    llm_server.reset()
    llm_server.script(facts_reply("Jun plays the cello every day."))
    for life in (add.start, add.caption, add.extract, add.decide):
        c.ledger.commit(job_id, life(job_id, c))
    systems = [r["messages"][0]["content"] for r in llm_server.requests]
    assert len(systems) == 2
    assert systems[0].startswith("Only keep facts about music.\n\n") and extract_stage.INSTRUCTIONS not in systems[0]
    assert systems[1].startswith("Never delete a memory about music.\n\n")
    assert decide_stage.REPLY_FORMAT in systems[1] or decide_stage.GRAPH_REPLY_FORMAT in systems[1]
    # And an add's own prompt still wins over the deployment's
    own = Producer(settings).build("Jun sings.", user_id=user_id, prompt="Keep everything.")
    [(own_id, _)] = c.ledger.jobs.enqueue([own])
    for life in (add.start, add.caption, add.extract):
        c.ledger.commit(own_id, life(own_id, c))
    assert llm_server.requests[-1]["messages"][0]["content"].startswith("Keep everything.\n\n")


class _CountingEmbedder:
    """The real embedder, with the texts of every call kept."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.dims = inner, inner.dims
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        vectors: list[list[float]] = self.inner.embed(texts)
        return vectors


def _extracted(by_hand: Clients, settings: Settings, text: str,
               user_id: str) -> tuple[_CountingEmbedder, Clients, str, Advance]:
    """A job of `text` taken through start and caption, and its extract stage's transition (not
    committed), with every embedding call counted."""
    counting = _CountingEmbedder(by_hand.embedder)
    c = dataclasses.replace(by_hand, embedder=counting)
    job_id = _enqueue(c, settings, text, user_id)
    for life in (add.start, add.caption):
        c.ledger.commit(job_id, life(job_id, c))
    extracted = add.extract(job_id, c)
    assert isinstance(extracted, Advance)
    return counting, c, job_id, extracted


def test_extract_embeds_the_facts_and_decide_uses_those_vectors_without_embedding_again(
        by_hand: Clients, settings: Settings, memories: Any, user_id: str) -> None:
    # When the extract stage runs
    counting, c, job_id, extracted = _extracted(by_hand, settings, "Olga keeps bees in her garden.", user_id)
    facts = extracted.output
    assert isinstance(facts, ExtractedFacts)
    # Then its output carries the facts' vectors, packed: the embedder's own, float32-exact
    assert counting.calls == [["Olga keeps bees in her garden."]]
    [stored] = packed.unpack(facts.vectors, len(facts.facts))
    assert np.allclose(stored, by_hand.embedder.embed(["Olga keeps bees in her garden."])[0], atol=1e-6)
    c.ledger.commit(job_id, extracted)
    # And the decide stage embeds nothing: the fact's vector is the memory's
    counting.calls.clear()
    decided = add.decide(job_id, c)
    assert isinstance(decided, Advance) and isinstance(decided.output, Plan) and counting.calls == []
    assert np.allclose(decided.output.actions[0].vector, stored, atol=1e-6)


def test_an_extract_output_without_vectors_is_embedded_by_decide(
        by_hand: Clients, settings: Settings, user_id: str) -> None:
    # Given an extract output stored without vectors (written before memq packed them)
    counting, c, job_id, extracted = _extracted(by_hand, settings, "Pim sails on Sundays.", user_id)
    assert isinstance(extracted.output, ExtractedFacts)
    c.ledger.commit(job_id, dataclasses.replace(extracted, output=extracted.output.model_copy(update={"vectors": ""})))
    counting.calls.clear()
    # When decide runs, it embeds the fact itself and plans the ADD with that vector
    decided = add.decide(job_id, c)
    assert isinstance(decided, Advance) and isinstance(decided.output, Plan)
    assert counting.calls == [["Pim sails on Sundays."]]
    assert [a.memory for a in decided.output.actions] == ["Pim sails on Sundays."]
    assert len(decided.output.actions[0].vector) == 384

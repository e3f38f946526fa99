"""A provider's 429s through the real worker (thread pool, in this process) and the LLM test server over
litellm: a 429 is a wait that never costs the job an attempt, with or without ``Retry-After``; without
it and with no ``MEMQ_LLM__RPM`` the shared limiter learns the provider's rate; only the rate-limit
time budget ends a rate-limited job, with a dead letter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import json
from typing import Any

import pytest
import redis

from broker.adaptive import PROBE_RPM
from broker.ratelimit import RateLimiter
from cli.redis_server import RedisServer
from memq.config import RedisSettings, Settings
from memq.models import JobState
from producer import Producer
from tests.helpers import until, wait_done
from tests.conftest import free_port
from tests.rigs.llm_server import LLMTestServer, Reply
from tests.rigs.workers import start_worker, stop_worker, wait_ready, worker_env

FACTS = ("I keep bonsai trees", "I restore old bicycles", "I brew ginger beer", "I collect vinyl records",
         "I grow chili peppers", "I learn Portuguese", "I run on Sunday mornings", "I paint watercolours",
         "I bake sourdough bread", "I play the cello", "I build model trains", "I climb at the gym")


def _forget_limits(settings: Settings) -> None:
    """Drop the worker's model's shared limiter state (its learned rate, pause and success counts)."""
    client = redis.Redis.from_url(settings.redis.url)
    client.delete(f"memq:ratelimit:{settings.llm.model}")
    client.close()


@pytest.fixture()
def provider(llm_server: LLMTestServer, settings: Settings, worker: Any) -> Iterator[LLMTestServer]:
    """The session's LLM server, for a test to give a limit; afterwards it is unlimited again and the
    worker's model has no learned rate (the session's other tests run unlimited)."""
    saved = llm_server.rpm_limit, llm_server.with_retry_after, llm_server.window_s
    _forget_limits(settings)
    yield llm_server
    llm_server.rpm_limit, llm_server.with_retry_after, llm_server.window_s = saved
    llm_server.reset()
    _forget_limits(settings)


def _tasks(kind: str) -> float:
    """Model-stage tasks of this worker by kind (`memq_stage_tasks_total`): ``retry`` is an attempt spent."""
    from prometheus_client import REGISTRY

    return sum(REGISTRY.get_sample_value("memq_stage_tasks_total", {"stage": stage, "kind": kind}) or 0.0
               for stage in ("caption", "extract", "decide"))


@pytest.mark.timeout(120)  # its 12 adds go at the provider's 2 calls a second, after the session's services start
def test_a_provider_throttling_without_retry_after_and_no_configured_limit_fails_no_job(
        provider: LLMTestServer, producer: Producer, memories: Any, settings: Settings, user_id: str) -> None:
    # Given a provider allowing 2 chat completions in any sliding second (120 a minute) that answers 429
    # without Retry-After past it, and no MEMQ_LLM__RPM: memq starts unlimited
    provider.rpm_limit, provider.with_retry_after, provider.window_s = 2, False, 1.0
    assert settings.llm.rpm is None
    retries, waits = _tasks("retry"), _tasks("waiting")

    # When 12 adds of 4 users arrive at once (more calls than the provider takes in a second)
    users = [f"{user_id}-{i}" for i in range(4)]
    receipts = producer.add_many([{"messages": f"{fact} since {2000 + n}.", "user_id": users[n % 4]}
                                  for n, fact in enumerate(FACTS)])
    statuses = producer.wait(receipts, timeout_s=150, poll_s=0.1)

    # Then every job succeeded, and each user has memories
    assert [s.status for s in statuses] == [JobState.SUCCEEDED] * len(FACTS), [s.error for s in statuses]
    assert all(memories.get_all(user_id=u)["results"] for u in users)
    # And the provider did refuse calls, and the worker's model learned a rate from it
    assert provider.rate_limited > 0
    limiter = RateLimiter(redis.Redis.from_url(settings.redis.url))
    assert limiter.learned_rpm(settings.llm.model) is not None
    # And no 429 cost an attempt: the model stages waited (re-queued), none retried
    assert _tasks("retry") == retries
    assert _tasks("waiting") > waits


def test_a_429_without_retry_after_before_any_success_still_gives_the_model_a_rate(
        provider: LLMTestServer, producer: Producer, settings: Settings, user_id: str) -> None:
    # Given a model with nothing sent in the last minute whose first answer is a 429 without Retry-After
    # (another client filled the provider's window): there is no achieved rate to cut from
    provider.script(Reply(status=429))
    retries = _tasks("retry")

    # When a job is added
    status = wait_done(producer, producer.add("I restore old bicycles on weekends.", user_id=user_id), timeout_s=60)

    # Then it succeeded without spending an attempt
    assert status.status is JobState.SUCCEEDED and status.error is None
    assert _tasks("retry") == retries
    # And the model is paced from then on at the probe rate (not left unlimited, which lets the backlog
    # burst after every pause)
    learned = RateLimiter(redis.Redis.from_url(settings.redis.url)).learned_rpm(settings.llm.model)
    assert learned is not None and learned <= PROBE_RPM + 1


def test_seven_429s_in_a_row_for_one_stage_cost_no_attempt_and_the_job_succeeds(
        provider: LLMTestServer, producer: Producer, user_id: str) -> None:
    # Given a provider that answers the next 7 calls 429 with Retry-After: 1 (a stage fails after 6 attempts)
    provider.script(*[Reply(status=429, headers={"Retry-After": "1"})] * 7)
    retries = _tasks("retry")

    # When a job is added
    status = wait_done(producer, producer.add("I restore old bicycles on weekends.", user_id=user_id), timeout_s=90)

    # Then it succeeded after the 7 refusals, none of them an attempt
    assert status.status is JobState.SUCCEEDED and status.error is None
    assert provider.calls >= 8
    assert _tasks("retry") == retries


def test_a_job_rate_limited_past_its_budget_fails_with_a_dead_letter_and_replays_once_the_provider_recovers(
        provider: LLMTestServer, producer: Producer, settings: Settings, user_id: str) -> None:
    from jobs.admin import replay_dead_letters
    from jobs.clients import build_clients

    # Given a provider that answers 429 (Retry-After: 1) to every call for a while, and a job rate-limited by it
    provider.script(*[Reply(status=429, headers={"Retry-After": "1"})] * 60)
    receipt = producer.add("I grow chili peppers on my balcony.", user_id=user_id)
    client = redis.Redis.from_url(settings.redis.url)
    record = f"memq:job:{receipt.job_id}"
    until(lambda: client.hget(record, "rate_limited_since") is not None, 60, "the job's first rate-limit")

    # When its stage has been rate-limited for longer than its budget (its first rate-limit a day and a minute ago)
    since = float(client.hget(record, "rate_limited_since") or 0)
    client.hset(record, "rate_limited_since", f"{since - settings.jobs.rate_limit_budget_s - 60:.6f}")

    # Then at its next rate-limit the job fails with RateLimitBudgetExceeded
    status = wait_done(producer, receipt, timeout_s=60)
    assert status.status is JobState.FAILED and status.error_type == "RateLimitBudgetExceeded", status
    # And a dead letter keeps it, with that reason
    clients = build_clients(settings)
    letters = {d.job_id: d for d in clients.records.dead_letters()}
    assert letters[receipt.job_id].error_type == "RateLimitBudgetExceeded"
    assert "MEMQ_JOBS__RATE_LIMIT_BUDGET_S" in letters[receipt.job_id].error

    # When the provider has recovered and the letter is replayed, Then the job succeeds
    provider.reset()
    assert replay_dead_letters(clients.ledger, [receipt.job_id]) == [receipt.job_id]
    assert wait_done(producer, receipt, timeout_s=60).status is JobState.SUCCEEDED
    client.close()


def test_a_429_saying_the_quota_is_used_up_fails_the_job_at_once_with_a_dead_letter_that_says_so(
        provider: LLMTestServer, producer: Producer, settings: Settings, user_id: str) -> None:
    from jobs.clients import build_clients

    # Given a provider whose account has no credit left: OpenAI's 429 with the code insufficient_quota
    quota = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                       "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    provider.script(*[Reply(status=429, raw_body=json.dumps(quota).encode())] * 3)

    # When a job is added
    receipt = producer.add("I brew ginger beer in summer.", user_id=user_id)
    status = wait_done(producer, receipt, timeout_s=60)

    # Then it failed at once, naming the cause (no wait, no retry: one call reached the provider)
    assert status.status is JobState.FAILED and status.error_type == "ProviderQuotaExhausted", status
    assert provider.calls == 1
    # And its dead letter says the quota is used up, not a rate limit
    letter = {d.job_id: d for d in build_clients(settings).records.dead_letters()}[receipt.job_id]
    assert letter.error_type == "ProviderQuotaExhausted"
    assert "insufficient_quota" in letter.error and "billing" in letter.error


@pytest.mark.timeout(240)
def test_a_hosted_embedders_429s_are_waits_on_a_budget_of_its_own_not_attempts(tmp_path: Path,
                                                                               settings: Settings) -> None:
    from pipeline.offline_model import answer

    with RedisServer() as own_redis, LLMTestServer(default=lambda prompt: json.dumps(answer(prompt))) as server:
        # Given a worker process whose embedder is hosted (litellm, at the test server) and which answers 429
        # to its next 7 requests: 6 with Retry-After: 1, then 1 without (a stage fails after 6 attempts)
        server.script_embeddings(*[Reply(status=429, headers={"Retry-After": "1"})] * 6, Reply(status=429))
        log = tmp_path / "worker.log"
        env = worker_env(own_redis.url, tmp_path / "data", MEMQ_LLM__MODEL="openai/test-model",
                         MEMQ_LLM__API_BASE=server.url, MEMQ_LLM__API_KEY="k", MEMQ_EMBEDDER__MODEL="openai/test-embed",
                         MEMQ_EMBEDDER__API_BASE=server.url, MEMQ_EMBEDDER__API_KEY="k",
                         MEMQ_METRICS__PORT=str(free_port()))
        worker = start_worker(env, log)
        producer = Producer(settings.model_copy(update={"redis": RedisSettings(url=own_redis.url)}))
        try:
            wait_ready(worker, log)
            # When a job is added (its decide stage embeds the facts)
            status = wait_done(producer, producer.add("I keep bonsai trees on my balcony.", user_id="embed-429"),
                               timeout_s=120)
        finally:
            producer.close()
            stop_worker(worker)
        # Then it succeeded after the 7 refusals, and none of them was an attempt
        assert status.status is JobState.SUCCEEDED and status.error is None, status
        assert len(server.embedding_requests) >= 8
        assert " will retry " not in log.read_text(errors="replace")
        # And the embedder's budget is its own: its 429 without Retry-After taught it a rate, the chat model's none
        limiter = RateLimiter(redis.Redis.from_url(own_redis.url))
        assert limiter.learned_rpm("embed:openai/test-embed") is not None
        assert limiter.learned_rpm("openai/test-model") is None

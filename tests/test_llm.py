"""The model seam: litellm over HTTP to the test server, with the shared rate limiter in front."""

from __future__ import annotations

import uuid

import pytest
import redis

from memq.config import LLMSettings
from memq.errors import ProviderThrottled, RateLimited
from broker.adaptive import DECREASE, PAUSE_S
from broker.ratelimit import RateLimiter
from tests.rigs.llm_server import LLMTestServer, Reply
from cli.redis_server import RedisServer
from pipeline.extract import FactsReply
from pipeline.llm import LLM


def _llm(server: LLMTestServer, redis_server: RedisServer, **limits: float) -> tuple[LLM, RateLimiter, str]:
    model = f"openai/limited-{uuid.uuid4().hex[:8]}"
    settings = LLMSettings(model=model, api_base=server.url, api_key="k", timeout_s=5, **limits)  # type: ignore[arg-type]
    limiter = RateLimiter(redis.Redis.from_url(redis_server.url))
    return LLM(settings, limiter=limiter), limiter, model


def test_a_call_without_budget_raises_rate_limited_before_reaching_the_provider(
        llm_server: LLMTestServer, redis_server: RedisServer) -> None:
    # Given a model limited to 1 request per minute, shared through Redis
    llm, _, _ = _llm(llm_server, redis_server, rpm=1, burst_s=60)
    llm_server.script('{"facts": []}')
    llm.complete_json("system", "user", FactsReply)
    # When a second call comes within the minute, Then it waits (no request is sent)
    with pytest.raises(RateLimited) as raised:
        llm.complete_json("system", "user", FactsReply)
    assert 50 < raised.value.retry_after_s <= 60 and llm_server.calls == 1


def test_a_provider_429_with_retry_after_is_a_wait_and_blocks_the_model_for_every_worker(
        llm_server: LLMTestServer, redis_server: RedisServer) -> None:
    llm, limiter, model = _llm(llm_server, redis_server, rpm=600)
    llm_server.script(Reply(status=429, headers={"Retry-After": "7"}))
    # When the provider answers 429 with Retry-After: 7
    with pytest.raises(RateLimited) as raised:
        llm.complete_json("system", "user", FactsReply)
    # Then the call is a wait of 7 s (RateLimited: re-queued, never an attempt), caused by the provider's 429
    assert raised.value.retry_after_s == 7
    assert isinstance(raised.value.__cause__, ProviderThrottled) and raised.value.__cause__.retry_after_s == 7
    # And any other worker asking for this model's budget now waits out the provider's Retry-After
    assert 6 < limiter.acquire(model, rpm=600, tpm=None, tokens=10) <= 7
    # And nothing is learned from it: the provider said when
    assert limiter.learned_rpm(model) is None


def test_a_429_without_retry_after_and_no_configured_limit_teaches_every_worker_a_rate(
        llm_server: LLMTestServer, redis_server: RedisServer) -> None:
    from prometheus_client import REGISTRY

    # Given a model with no configured limit whose first 3 calls succeed
    llm, limiter, model = _llm(llm_server, redis_server)
    llm_server.script(*['{"facts": []}'] * 3, Reply(status=429))
    for _ in range(3):
        llm.complete_json("system", "user", FactsReply)
    assert limiter.learned_rpm(model) is None  # unlimited until the provider says otherwise

    # When the provider answers 429 without Retry-After
    with pytest.raises(RateLimited) as raised:
        llm.complete_json("system", "user", FactsReply)

    # Then the call is a wait of the learned pause, caused by the provider's 429 (no Retry-After)
    assert raised.value.retry_after_s == pytest.approx(PAUSE_S, abs=0.05)
    assert isinstance(raised.value.__cause__, ProviderThrottled) and raised.value.__cause__.retry_after_s is None
    # And the model now has a learned rate, at most DECREASE x its 3 successes per minute taken over >= 1 s
    learned = limiter.learned_rpm(model)
    assert learned is not None and 1 <= learned <= DECREASE * 3 * 60 + 1e-6
    # And this worker's gauge shows it
    assert REGISTRY.get_sample_value("memq_llm_learned_rpm", {"budget": model}) == learned


@pytest.mark.parametrize("provider_says", ["ok", "429"])
def test_a_redis_outage_during_the_call_loses_no_reply_and_turns_no_429_into_an_attempt(
        provider_says: str, tmp_path: object) -> None:
    import threading
    import time

    # Given a model behind the shared limiter on a Redis of its own, and a provider taking 2 s to answer
    server = LLMTestServer(latency_s=2.0).start()
    try:
        with RedisServer() as own_redis:
            llm, _, _ = _llm(server, own_redis)
            server.script('{"facts": ["Ann likes tea"]}' if provider_says == "ok" else Reply(status=429))
            outcome: dict[str, object] = {}

            def call() -> None:
                try:
                    outcome["reply"] = llm.complete_json("system", "user", FactsReply)[0]
                except Exception as exc:  # the outcome under test
                    outcome["error"] = exc

            caller = threading.Thread(target=call)
            caller.start()
            # When Redis goes away while the request is at the provider (the limiter let it through)
            deadline = time.monotonic() + 30
            while server.calls < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            own_redis.stop()
            caller.join(30)
    finally:
        server.stop()
    # Then a reply is kept (the limiter's bookkeeping is best effort), and a 429 is still a wait
    if provider_says == "ok":
        reply = outcome.get("reply")
        assert isinstance(reply, FactsReply) and [f.text for f in reply.facts] == ["Ann likes tea"], outcome
    else:
        error = outcome.get("error")
        assert isinstance(error, RateLimited) and error.retry_after_s == pytest.approx(PAUSE_S), outcome


def test_a_retry_after_given_as_an_http_date_blocks_the_model_until_then(
        llm_server: LLMTestServer, redis_server: RedisServer) -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    llm, limiter, model = _llm(llm_server, redis_server)
    # When the provider answers 429 with Retry-After as an HTTP-date 10 s from now (whole seconds)
    when = datetime.now(timezone.utc) + timedelta(seconds=10)
    llm_server.script(Reply(status=429, headers={"Retry-After": format_datetime(when, usegmt=True)}))
    with pytest.raises(RateLimited) as raised:
        llm.complete_json("system", "user", FactsReply)
    # Then the wait is the time until that date, not the learned pause, and every worker waits it out
    assert 5 < raised.value.retry_after_s <= 10
    assert 5 < limiter.acquire(model, rpm=None, tpm=None, tokens=10) <= 10
    # And nothing is learned from it: the provider said when
    assert limiter.learned_rpm(model) is None


def test_retry_after_reads_seconds_and_http_dates_and_nothing_else() -> None:
    from datetime import datetime, timezone

    from stores.provider import retry_after_s

    now = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_s("7", now=now) == 7.0
    assert retry_after_s("Sun, 22 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert retry_after_s("Sun, 22 Nov 2026 11:59:00 GMT", now=now) == 0.0  # already past: no wait
    assert retry_after_s("soon", now=now) is None and retry_after_s("inf", now=now) is None

"""The model seam: litellm over HTTP to the test server, with the shared rate limiter in front."""

from __future__ import annotations

import uuid

import pytest
import redis

from memq.config import LLMSettings
from memq.errors import LLMUnavailable, RateLimited
from broker.ratelimit import RateLimiter
from tests.rigs.llm_server import LLMTestServer, Reply
from cli.redis_server import RedisServer
from pipeline.extract import FactsReply
from pipeline.llm import LLM


def _llm(server: LLMTestServer, redis_server: RedisServer, **limits: int) -> tuple[LLM, RateLimiter, str]:
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


def test_a_provider_429_with_retry_after_blocks_the_model_for_every_worker(
        llm_server: LLMTestServer, redis_server: RedisServer) -> None:
    llm, limiter, model = _llm(llm_server, redis_server, rpm=600)
    llm_server.script(Reply(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(LLMUnavailable) as raised:
        llm.complete_json("system", "user", FactsReply)
    assert raised.value.retry_after_s == 7
    # Any other worker asking for this model's budget now waits out the provider's Retry-After
    assert 6 < limiter.acquire(model, rpm=600, tpm=None, tokens=10) <= 7

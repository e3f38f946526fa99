"""The global LLM rate limiter against a real redis-server (with the rate it learns from 429s without
Retry-After), and the LLM test server's provider-side limit.

The limiter runs on a clock the test moves by hand (`Clock`), so every wait is exact and nothing
depends on how fast a loaded machine runs; one test checks Redis's own clock, with bounds only.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memq.errors import StoreUnavailable, TransientError
from broker.adaptive import (BURST_CALLS, DECREASE, FLOOR_RPM, LEARNED_TTL_S, PAUSE_MAX_S, PAUSE_S, PROBE_MAX, PROBE_RPM,
                             STEP_RPM)
from broker.ratelimit import IDLE_TTL_S, RateLimiter
from tests.rigs.llm_server import LLMTestServer
from cli.redis_server import RedisServer

MODEL = "openai/test-model"


def _client(url: str) -> redis.Redis:
    """A client that fails at once when Redis is gone (no retries with backoff)."""
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))


def _drain(limiter: RateLimiter, *, rpm: int) -> tuple[int, float]:
    """Acquire single requests until refused; returns (grants, the refusal's wait in seconds)."""
    grants = 0
    while (wait := limiter.acquire(MODEL, rpm=rpm, tpm=None, tokens=0)) == 0.0:
        grants += 1
    return grants, wait


@pytest.fixture()
def prefix(redis_server: RedisServer) -> Iterator[str]:
    """A key prefix of the test's own; its keys are removed afterwards."""
    key_prefix = f"memq:test-ratelimit:{uuid.uuid4().hex}"
    yield key_prefix
    client = _client(redis_server.url)
    keys = list(client.scan_iter(match=f"{key_prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


class Clock:
    """Time (seconds) that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def limiter(redis_server: RedisServer, prefix: str, clock: Clock) -> Iterator[RateLimiter]:
    client = _client(redis_server.url)
    yield RateLimiter(client, key_prefix=prefix, clock=clock)
    client.close()


def test_a_burst_is_granted_up_to_the_rpm_capacity_then_refused_for_about_one_refill_interval(
        limiter: RateLimiter) -> None:
    # Given a model allowed 60 requests per minute (one refills every second)
    # When requests arrive back to back until one is refused
    grants, wait = _drain(limiter, rpm=60)
    again = limiter.acquire(MODEL, rpm=60, tpm=None, tokens=0)

    # Then exactly the capacity was granted, and the refusal waits one refill interval
    assert grants == 60
    assert wait == pytest.approx(1.0)
    # And a refusal takes nothing: asking again at the same time gets the same wait
    assert again == wait


def test_a_refused_caller_is_granted_after_waiting_the_returned_seconds(limiter: RateLimiter, clock: Clock) -> None:
    # Given a drained budget of 600 requests per minute (one refills every 0.1 s)
    grants, wait = _drain(limiter, rpm=600)
    assert grants == 600 and wait == pytest.approx(0.1)

    # When the caller waits as told
    clock.advance(wait)

    # Then it is granted
    assert limiter.acquire(MODEL, rpm=600, tpm=None, tokens=0) == 0.0


def test_the_token_budget_refuses_a_big_request_and_grants_it_after_the_returned_wait(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given 6000 tokens per minute (100 per second), of which 5990 and then 5 are taken
    assert limiter.acquire(MODEL, rpm=None, tpm=6000, tokens=5990) == 0.0
    assert limiter.acquire(MODEL, rpm=None, tpm=6000, tokens=5) == 0.0

    # When a 30-token request comes (about 5 tokens are left)
    wait = limiter.acquire(MODEL, rpm=None, tpm=6000, tokens=30)

    # Then it must wait for the 25 missing tokens, 0.25 s, and is granted after that
    assert wait == pytest.approx(0.25)
    clock.advance(wait)
    assert limiter.acquire(MODEL, rpm=None, tpm=6000, tokens=30) == 0.0


def test_two_limiters_on_two_connections_share_one_budget(redis_server: RedisServer, prefix: str,
                                                          clock: Clock) -> None:
    # Given two workers, each with its own Redis connection and limiter
    clients = [_client(redis_server.url), _client(redis_server.url)]
    first, second = (RateLimiter(c, key_prefix=prefix, clock=clock) for c in clients)

    # When they take turns on a budget of 10 requests per minute
    waits = [w.acquire(MODEL, rpm=10, tpm=None, tokens=0) for _ in range(5) for w in (first, second)]

    # Then together they get exactly 10, and both are refused after that
    assert waits == [0.0] * 10
    assert first.acquire(MODEL, rpm=10, tpm=None, tokens=0) == pytest.approx(6.0)
    assert second.acquire(MODEL, rpm=10, tpm=None, tokens=0) == pytest.approx(6.0)
    # And another model's budget is untouched
    assert second.acquire("other/model", rpm=10, tpm=None, tokens=0) == 0.0
    for c in clients:
        c.close()


def test_a_block_makes_acquire_return_the_remaining_time_and_the_later_block_wins(limiter: RateLimiter,
                                                                                 clock: Clock) -> None:
    # Given a provider's 429 with Retry-After: 5
    limiter.block(MODEL, 5.0)

    # When workers ask for budget, and shorter and longer blocks arrive
    during = limiter.acquire(MODEL, rpm=600, tpm=6000, tokens=10)
    limiter.block(MODEL, 2.0)
    after_shorter = limiter.acquire(MODEL, rpm=600, tpm=6000, tokens=10)
    limiter.block(MODEL, 8.0)
    after_longer = limiter.acquire(MODEL, rpm=600, tpm=6000, tokens=10)

    # Then each is told the remaining block time, and a shorter block never shortens it
    assert during == pytest.approx(5.0) and after_shorter == pytest.approx(5.0)
    assert after_longer == pytest.approx(8.0)

    # And when a short block ends, budget is granted again
    limiter.block("short/model", 0.15)
    wait = limiter.acquire("short/model", rpm=600, tpm=None, tokens=0)
    assert wait == pytest.approx(0.15)
    clock.advance(wait)
    assert limiter.acquire("short/model", rpm=600, tpm=None, tokens=0) == 0.0


def test_record_actual_charges_the_difference_and_later_callers_wait_for_the_debt(limiter: RateLimiter) -> None:
    # Given a call estimated at 100 tokens under 600 tokens per minute (10 per second)
    assert limiter.acquire(MODEL, rpm=None, tpm=600, tokens=100) == 0.0

    # When the provider reports 700 tokens used
    limiter.record_actual(MODEL, tpm=600, estimated=100, actual=700)

    # Then the bucket owes 100 tokens: even 1 token waits (100 + 1) / 10 s
    assert limiter.acquire(MODEL, rpm=None, tpm=600, tokens=1) == pytest.approx(10.1)

    # And a refund fills it again, never past the capacity
    limiter.record_actual(MODEL, tpm=600, estimated=2000, actual=0)
    assert limiter.acquire(MODEL, rpm=None, tpm=600, tokens=600) == 0.0
    assert limiter.acquire(MODEL, rpm=None, tpm=600, tokens=1) > 0.0


def test_eight_threads_hammering_never_get_more_than_the_budget(limiter: RateLimiter) -> None:
    # Given 60 requests per minute (capacity 60) and 8 threads, at one instant
    grants = [0] * 8

    def hammer(i: int) -> None:
        for _ in range(30):
            if limiter.acquire(MODEL, rpm=60, tpm=None, tokens=0) == 0.0:
                grants[i] += 1

    # When they all ask 30 times each, as fast as they can (240 asks)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Then exactly the capacity was granted, however the asks interleaved
    assert sum(grants) == 60


def test_with_redis_time_a_refusal_waits_at_most_one_refill_interval(redis_server: RedisServer, prefix: str) -> None:
    # Given a limiter on Redis's own clock (production) and 6 requests per minute
    client = _client(redis_server.url)
    limiter = RateLimiter(client, key_prefix=prefix + ":redis-time")
    # When requests come back to back until one is refused
    grants, wait = _drain(limiter, rpm=6)
    # Then at least the capacity was granted and the refusal waits at most one refill interval (10 s)
    assert grants >= 6 and 0.0 < wait <= 10.0
    client.close()


def test_a_request_for_more_tokens_than_the_tpm_capacity_does_not_wait_forever(limiter: RateLimiter) -> None:
    # Given 600 tokens per minute (10 per second), half used
    assert limiter.acquire(MODEL, rpm=None, tpm=600, tokens=300) == 0.0

    # When a request asks for 6000 tokens, ten times the capacity
    wait = limiter.acquire(MODEL, rpm=None, tpm=600, tokens=6000)

    # Then it waits only until the bucket is full (300 tokens at 10 per second), never more than 60 s
    assert wait == pytest.approx(30.0)
    # And on a full bucket it is granted at once, leaving a finite debt for later callers
    assert limiter.acquire("fresh/model", rpm=None, tpm=600, tokens=6000) == 0.0
    debt_wait = limiter.acquire("fresh/model", rpm=None, tpm=600, tokens=1)
    assert math.isfinite(debt_wait) and debt_wait == pytest.approx(540.1)


def test_keys_expire_when_a_model_is_idle_and_unlimited_calls_write_nothing(
        limiter: RateLimiter, redis_server: RedisServer, prefix: str) -> None:
    # Given a granted request, a long block on another model, and a call with no limits on a third
    client = _client(redis_server.url)
    limiter.acquire(MODEL, rpm=60, tpm=6000, tokens=100)
    limiter.block("blocked/model", 300.0)
    assert limiter.acquire("free/model", rpm=None, tpm=None, tokens=10**9) == 0.0

    # When we look at their keys' lifetimes
    ttl_ms = client.pttl(f"{prefix}:{MODEL}")
    blocked_ttl_ms = client.pttl(f"{prefix}:blocked/model")
    free_exists = client.exists(f"{prefix}:free/model")
    client.close()

    # Then the idle key expires within IDLE_TTL_S, the blocked one outlives its block, the free one is absent
    assert 0 < ttl_ms <= IDLE_TTL_S * 1000
    assert blocked_ttl_ms >= 299_000
    assert free_exists == 0


def test_bad_limits_and_token_counts_are_refused(limiter: RateLimiter) -> None:
    # Given a limiter
    # When it is given a zero limit, negative tokens or a negative block
    # Then each is refused before touching Redis
    with pytest.raises(ValueError, match="rpm"):
        limiter.acquire(MODEL, rpm=0, tpm=None, tokens=1)
    with pytest.raises(ValueError, match="tokens"):
        limiter.acquire(MODEL, rpm=None, tpm=10, tokens=-1)
    with pytest.raises(ValueError, match="seconds"):
        limiter.block(MODEL, -1.0)
    with pytest.raises(ValueError, match="token counts"):
        limiter.record_actual(MODEL, tpm=10, estimated=-1, actual=0)


def test_the_limiter_raises_store_unavailable_when_redis_is_stopped() -> None:
    # Given a limiter whose Redis has just stopped
    with RedisServer() as server:
        client = _client(server.url)
        limiter = RateLimiter(client, key_prefix="memq:test-ratelimit")
        assert limiter.acquire(MODEL, rpm=60, tpm=None, tokens=0) == 0.0
        server.stop()

        # When it is asked for budget, a block or a correction
        # Then it raises StoreUnavailable, a TransientError (retried with backoff)
        with pytest.raises(StoreUnavailable) as caught:
            limiter.acquire(MODEL, rpm=60, tpm=None, tokens=0)
        assert isinstance(caught.value, TransientError)
        with pytest.raises(StoreUnavailable):
            limiter.block(MODEL, 1.0)
        with pytest.raises(StoreUnavailable):
            limiter.record_actual(MODEL, tpm=600, estimated=1, actual=2)
        client.close()


def _post_chat(server: LLMTestServer) -> tuple[int, str | None]:
    """POST a minimal chat completion; returns (HTTP status, Retry-After header or None)."""
    body = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(server.url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Retry-After")


def test_the_llm_test_server_answers_429_with_retry_after_past_its_rpm_limit() -> None:
    # Given a test provider allowing 3 requests per minute
    with LLMTestServer(rpm_limit=3) as server:
        # When 4 requests arrive within the minute
        answers = [_post_chat(server) for _ in range(4)]

        # Then the first 3 succeed and the 4th gets 429 with a whole-second Retry-After of 1..60
        assert [status for status, _ in answers] == [200, 200, 200, 429]
        retry_after = answers[3][1]
        assert retry_after is not None and 1 <= int(retry_after) <= 60
        assert server.rate_limited == 1 and server.calls == 4


def test_the_llm_test_server_can_send_its_429s_without_retry_after() -> None:
    # Given a test provider allowing 1 request per minute and told to omit Retry-After
    with LLMTestServer(rpm_limit=1, with_retry_after=False) as server:
        # When 2 requests arrive
        first, second = _post_chat(server), _post_chat(server)

        # Then the second gets 429 with no Retry-After header
        assert first == (200, None)
        assert second == (429, None)
        assert server.rate_limited == 1


def test_a_short_burst_caps_what_can_be_spent_at_once(limiter: RateLimiter) -> None:
    # Given a 600/min budget that may burst only 1 s of budget (10 requests)
    grants = sum(limiter.acquire(MODEL, rpm=600, tpm=None, tokens=0, burst_s=1.0) == 0 for _ in range(30))
    # Then 10 are granted at once, not 600
    assert grants == 10


# --- the rate learned from 429s without Retry-After (broker.adaptive) ---------------------------------

def _called_long_ago(limiter: RateLimiter, clock: Clock, *, rpm: int | None = None) -> None:
    """A model whose first success was over a minute ago (so the achieved rate is taken over a full minute)."""
    limiter.succeeded(MODEL, rpm=rpm)
    clock.advance(120.0)


def _succeed(limiter: RateLimiter, clock: Clock, calls: int, over_s: float, *, rpm: int | None = None) -> float | None:
    """`calls` successful calls spread evenly over `over_s` seconds; returns the learned rate after the last."""
    learned = None
    for _ in range(calls):
        clock.advance(over_s / calls)
        learned = limiter.succeeded(MODEL, rpm=rpm)
    return learned


def test_a_429_without_retry_after_lowers_the_rate_to_nine_tenths_of_what_succeeded_over_the_last_minute(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given a model with no configured limit whose calls succeeded 60 times over the last minute
    _called_long_ago(limiter, clock)
    assert _succeed(limiter, clock, 60, 60.0) is None
    assert limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) == 0.0

    # When the provider answers 429 without Retry-After to a call sent 0.3 s ago
    throttle = limiter.throttled(MODEL, sent_s_ago=0.3, rpm=None)

    # Then the model learns DECREASE x 60 requests per minute and every worker pauses PAUSE_S
    assert throttle.reacted and throttle.learned_rpm == pytest.approx(DECREASE * 60)
    assert throttle.pause_s == pytest.approx(PAUSE_S)
    assert limiter.learned_rpm(MODEL) == pytest.approx(DECREASE * 60)
    assert limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) == pytest.approx(PAUSE_S)
    # And after the pause calls are spaced at the learned rate (a bucket of one call): one granted, the next
    # one interval later
    clock.advance(PAUSE_S)
    assert limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) == 0.0
    assert limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) == pytest.approx(60 / (DECREASE * 60))


def test_before_a_minute_of_history_the_achieved_rate_is_taken_over_the_time_since_the_first_success(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given 20 successes in the first 10 s (a provider with a short window: 2 per second)
    _succeed(limiter, clock, 20, 10.0)
    # When a 429 comes, Then the rate learned is about DECREASE x 120 per minute (20 in the 9.5 s since the
    # first success), not DECREASE x 20
    assert limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None).learned_rpm == pytest.approx(DECREASE * 120, rel=0.06)


def test_memqs_own_pauses_do_not_count_as_time_the_provider_refused(limiter: RateLimiter, clock: Clock) -> None:
    # Given a provider taking 2 calls a second: 2 succeed, the next is refused (learned DECREASE x 120)
    _succeed(limiter, clock, 2, 0.3)
    first = limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None)
    assert first.learned_rpm == pytest.approx(DECREASE * 120)
    # When after the pause 2 more succeed at once and the next is refused
    clock.advance(first.pause_s)
    _succeed(limiter, clock, 2, 0.3)
    again = limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None)
    # Then the 1 s pause is not counted against the provider: 4 calls in the 0.6 s memq was sending is
    # more than the rate learned, which stays (a 429 never raises it); 4 over 1.6 s would have lowered it
    assert again.reacted and again.learned_rpm == pytest.approx(DECREASE * 120 + 2 * STEP_RPM)


def test_successes_of_calls_sent_before_a_429s_reaction_count_in_what_it_measured(limiter: RateLimiter,
                                                                                 clock: Clock) -> None:
    # Given 8 calls sent at once to a provider taking 3 a second: one answer arrives, then a 429
    clock.advance(0.3)
    limiter.succeeded(MODEL, sent_s_ago=0.3, rpm=None)
    early = limiter.throttled(MODEL, sent_s_ago=0.3, rpm=None)
    assert early.learned_rpm == pytest.approx(DECREASE * 60)  # 1 success in (at least) 1 s

    # When the two other successes of that batch are answered after the reaction
    rates = [limiter.succeeded(MODEL, sent_s_ago=0.3, rpm=None) for _ in range(2)]
    # Then each is counted in the measure, as if it had come first: 2, then 3 calls in the second
    assert rates == pytest.approx([DECREASE * 120, DECREASE * 180])
    # And other 429s of the batch change nothing
    assert not limiter.throttled(MODEL, sent_s_ago=0.3, rpm=None).reacted


def test_after_429s_that_outlast_a_pause_the_first_success_takes_the_rate_over_the_whole_stretch(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given a cold start against a one-minute window of 60: 60 calls succeed in 9 s, then every call is refused
    _succeed(limiter, clock, 60, 9.0)
    reactions = []
    while clock.now < 1_000_000 + 55:
        reactions.append(limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None))
        clock.advance(reactions[-1].pause_s + 0.1)
    # Then the 429s alone leave a rate measured over less than a minute, above the limit
    assert len(reactions) >= 5 and (reactions[-1].learned_rpm or 0) > 60

    # When the window frees and a call succeeds (after 60 s)
    clock.now = max(clock.now, 1_000_000 + 61)
    learned = limiter.succeeded(MODEL, rpm=None)
    # Then the rate is the 61 calls the provider let through over that minute, times DECREASE
    assert learned == pytest.approx(DECREASE * 61)
    # And the provider showed a window longer than a pause: the learned rate's bucket holds BURST_CALLS
    # calls instead of one, then spaces calls at the rate
    grants = [limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) for _ in range(BURST_CALLS + 1)]
    assert grants[:BURST_CALLS] == [0.0] * BURST_CALLS and grants[-1] == pytest.approx(60 / learned)


def test_the_longer_a_learned_rate_holds_without_429s_the_faster_it_probes(limiter: RateLimiter,
                                                                          clock: Clock) -> None:
    # Given a learned rate of DECREASE x 60, used at its pace (54 successes over the minute after its 429)
    _called_long_ago(limiter, clock)
    _succeed(limiter, clock, 60, 60.0)
    limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None)
    refused_at = clock.now
    in_first_minute = _succeed(limiter, clock, 54, 59.0)
    assert in_first_minute is not None

    # When it is still used and unrefused three minutes after the 429
    clock.now = refused_at + 180.0
    _succeed(limiter, clock, 108, 0.0)  # the last minute's calls, so that it counts as used
    before = limiter.succeeded(MODEL, rpm=None)
    after = limiter.succeeded(MODEL, rpm=None)
    # Then each success adds 3 steps (one per minute since the 429, at most PROBE_MAX)
    assert before is not None and after == pytest.approx(before + min(3, PROBE_MAX) * STEP_RPM)


def test_429s_of_calls_in_flight_together_react_once_and_a_run_of_429s_doubles_the_pause(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given a first 429 (60 successes in the last minute)
    _succeed(limiter, clock, 60, 60.0)
    first = limiter.throttled(MODEL, sent_s_ago=0.3, rpm=None)

    # When 429s come for calls that were sent before that reaction (in flight at the same time)
    clock.advance(0.2)
    echo = limiter.throttled(MODEL, sent_s_ago=0.4, rpm=None)
    # Then nothing changes: same rate, the pause left is the first one's
    assert not echo.reacted and echo.learned_rpm == first.learned_rpm
    assert echo.pause_s == pytest.approx(PAUSE_S - 0.2)

    # When calls sent after each pause are refused again, with no success in between
    pauses = []
    for _ in range(7):
        clock.advance(PAUSE_MAX_S + 0.1)
        pauses.append(limiter.throttled(MODEL, sent_s_ago=0.05, rpm=None).pause_s)
    # Then each reaction doubles the pause, up to PAUSE_MAX_S
    assert pauses == pytest.approx([2 * PAUSE_S, 4 * PAUSE_S, 8 * PAUSE_S, 16 * PAUSE_S, PAUSE_MAX_S, PAUSE_MAX_S,
                                    PAUSE_MAX_S])
    # And a success after the pause ends the run: the next 429 pauses PAUSE_S again
    clock.advance(PAUSE_MAX_S)
    _succeed(limiter, clock, 1, 0.1)
    assert limiter.throttled(MODEL, sent_s_ago=0.05, rpm=None).pause_s == pytest.approx(PAUSE_S)


def test_the_learned_rate_rises_a_small_step_per_success_while_used_and_not_while_idle(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given a learned rate of DECREASE x 60 per minute
    _called_long_ago(limiter, clock)
    _succeed(limiter, clock, 60, 60.0)
    learned = limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None).learned_rpm
    assert learned == pytest.approx(DECREASE * 60)

    # When 54 calls succeed over the next minute (the rate is used: at least USED of it)
    after = _succeed(limiter, clock, 54, 60.0)
    # Then it rose by STEP_RPM per success while the achieved rate was at least USED of it
    assert after is not None and learned + STEP_RPM <= after <= learned + 54 * STEP_RPM

    # When calls come only now and then (2 a minute: far below USED of the rate)
    idle = _succeed(limiter, clock, 20, 600.0)
    # Then it does not grow
    assert idle == pytest.approx(after)


def test_two_limiters_on_two_connections_share_the_learned_rate(redis_server: RedisServer, prefix: str,
                                                                clock: Clock) -> None:
    # Given two workers with their own connections
    clients = [_client(redis_server.url), _client(redis_server.url)]
    first, second = (RateLimiter(c, key_prefix=prefix, clock=clock) for c in clients)

    # When the first worker's calls succeed and then one gets a 429
    for _ in range(30):
        clock.advance(1.0)
        first.succeeded(MODEL, rpm=None)
    learned = first.throttled(MODEL, sent_s_ago=0.1, rpm=None).learned_rpm

    # Then the second worker sees the same learned rate and the same pause
    assert learned is not None and second.learned_rpm(MODEL) == learned
    assert second.acquire(MODEL, rpm=None, tpm=None, tokens=0) == pytest.approx(PAUSE_S)
    # And a success reported by the second moves the rate both see
    clock.advance(PAUSE_S)
    assert second.succeeded(MODEL, rpm=None) == first.learned_rpm(MODEL)
    for c in clients:
        c.close()


def test_a_configured_rpm_is_a_ceiling_the_learned_rate_never_exceeds(limiter: RateLimiter, clock: Clock) -> None:
    # Given a configured limit of 30 per minute and 60 successes in the last minute
    _called_long_ago(limiter, clock, rpm=30)
    _succeed(limiter, clock, 60, 60.0, rpm=30)
    # When a 429 comes: DECREASE x 60 is above the ceiling, so nothing is learned and the configured rate rules
    assert limiter.throttled(MODEL, sent_s_ago=0.1, rpm=30).learned_rpm is None

    # When later only 20 succeeded in the last minute before a 429
    clock.advance(120.0)
    _succeed(limiter, clock, 20, 60.0, rpm=30)
    learned = limiter.throttled(MODEL, sent_s_ago=0.1, rpm=30).learned_rpm
    # Then the rate is lowered below the ceiling, and acquire spaces calls by it
    assert learned == pytest.approx(DECREASE * 20)
    clock.advance(PAUSE_S)
    assert limiter.acquire(MODEL, rpm=30, tpm=None, tokens=0) == 0.0
    assert limiter.acquire(MODEL, rpm=30, tpm=None, tokens=0) == pytest.approx(60 / (DECREASE * 20))

    # When successes raise it to the ceiling, Then it is dropped and the configured rate rules again
    raised = [limiter.succeeded(MODEL, rpm=30) for _ in range(400)]
    assert raised[-1] is None and limiter.learned_rpm(MODEL) is None
    assert all(r is None or r < 30 for r in raised)


def test_429s_with_nothing_measured_halve_the_rate_so_each_pause_ends_with_one_call_not_the_backlog(
        limiter: RateLimiter, clock: Clock) -> None:
    # Given an unlimited model whose last success was over a minute ago (another client filled the
    # provider's window: nothing memq sent went through in the last minute)
    _succeed(limiter, clock, 1, 1.0)
    clock.advance(61.0)
    # When a 429 comes, Then with nothing to measure the model starts at PROBE_RPM and pauses
    first = limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None)
    assert first.reacted and first.learned_rpm == pytest.approx(PROBE_RPM) and first.pause_s == pytest.approx(PAUSE_S)
    # And after the pause one call goes, not the whole backlog (8 workers asking at once)
    clock.advance(first.pause_s)
    grants = [limiter.acquire(MODEL, rpm=None, tpm=None, tokens=0) for _ in range(8)]
    assert grants[0] == 0.0 and all(g == pytest.approx(60 / PROBE_RPM) for g in grants[1:])

    # When that call and each one after the next pause are refused too
    rates = []
    for _ in range(8):
        clock.advance(PAUSE_MAX_S + 0.1)
        rates.append(limiter.throttled(MODEL, sent_s_ago=0.05, rpm=None).learned_rpm)
    # Then each refusal halves the rate, down to the floor of FLOOR_RPM and never under it
    assert rates == pytest.approx([max(FLOOR_RPM, PROBE_RPM / 2 ** k) for k in range(1, 9)])
    assert rates[-1] == pytest.approx(FLOOR_RPM)


def test_with_a_configured_rpm_a_429_with_nothing_measured_halves_the_ceiling(limiter: RateLimiter,
                                                                             clock: Clock) -> None:
    # Given MEMQ_LLM__RPM=40 and no call in the last minute
    # When a 429 comes, Then the model is paced at half the ceiling, below it
    assert limiter.throttled(MODEL, sent_s_ago=0.1, rpm=40).learned_rpm == pytest.approx(20.0)
    clock.advance(PAUSE_S)
    assert limiter.acquire(MODEL, rpm=40, tpm=None, tokens=0) == 0.0
    assert limiter.acquire(MODEL, rpm=40, tpm=None, tokens=0) == pytest.approx(60 / 20.0)


def test_the_learned_rate_never_goes_below_the_floor(limiter: RateLimiter, clock: Clock) -> None:
    # Given a learned rate (a 429 with nothing measured)
    _succeed(limiter, clock, 1, 1.0)
    clock.advance(61.0)
    limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None)

    # When one call succeeds in a minute and a 429 follows, again and again
    rates = []
    for _ in range(5):
        clock.advance(PAUSE_MAX_S)
        _succeed(limiter, clock, 1, 60.0)
        rates.append(limiter.throttled(MODEL, sent_s_ago=0.1, rpm=None).learned_rpm)
    # Then the rate is held at the floor of FLOOR_RPM (DECREASE x 1 is below it), never under it
    assert rates[0] == pytest.approx(FLOOR_RPM) and all(r is not None and FLOOR_RPM <= r < 1.5 for r in rates)


def test_learned_state_lives_an_hour_after_the_last_call_and_bad_arguments_are_refused(
        limiter: RateLimiter, redis_server: RedisServer, prefix: str) -> None:
    # Given a model with one success
    limiter.succeeded(MODEL, rpm=None)
    client = _client(redis_server.url)
    ttl_ms = client.pttl(f"{prefix}:{MODEL}")
    client.close()
    # Then its key lives LEARNED_TTL_S from now
    assert LEARNED_TTL_S * 1000 - 5000 < ttl_ms <= LEARNED_TTL_S * 1000
    # And nonsense is refused before touching Redis
    with pytest.raises(ValueError, match="sent_s_ago"):
        limiter.throttled(MODEL, sent_s_ago=-1.0, rpm=None)
    with pytest.raises(ValueError, match="rpm"):
        limiter.succeeded(MODEL, rpm=0)

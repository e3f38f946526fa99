"""A global rate limiter for LLM calls, shared through Redis by every worker process on every machine.

Algorithm: the classic token bucket (the idea behind GCRA, the generic cell rate algorithm, which
stores a "theoretical arrival time" instead of a level), written here as one Lua script. Each model
has two buckets:

- requests: refilled continuously at ``rpm / 60`` requests per second;
- tokens: refilled continuously at ``tpm / 60`` tokens per second;

each holding at most ``burst_s`` seconds of budget (60 by default: a whole minute's budget at once).

A bucket stores its level and the Redis server time of its last update; its level now is
``min(capacity, level + elapsed_s * capacity / 60)``, and a bucket never written is full. An acquire
takes 1 request and the call's tokens only when both buckets hold enough, else it takes nothing and
answers how long (seconds) until both will. Time is always Redis's (``TIME``), so the clocks of the
workers don't matter, and the script runs atomically in one round trip, so no two workers can spend
the same budget.

A provider's 429 with ``Retry-After`` becomes a ``blocked_until`` (Redis server time, seconds): until
then nobody gets budget for that model, and a later block never shortens an earlier one.

Token counts are estimates before the call; `RateLimiter.record_actual` corrects the bucket by
``actual - estimated`` afterwards. The token level may go negative (a debt): later callers then wait
for the debt to refill, as the provider's own TPM counter would make them.

A request asking for more tokens than the TPM capacity waits only for a full bucket (its need is
capped at the capacity), then is granted and takes all its tokens, leaving a debt; it never waits
forever.

A provider's 429 *without* ``Retry-After`` teaches the model a rate (`broker.adaptive`: lowered on
each 429, raised slowly while calls succeed), kept in the same hash; the request bucket then refills
at the lower of the configured ``rpm`` and the learned rate (with no ``rpm``, at the learned rate), with
a bucket of one call (`broker.adaptive.BURST_CALLS` once the provider showed a long window).

Keys: ``{key_prefix}:{model}``, one hash per model with fields ``r_level``, ``r_ts``, ``t_level``,
``t_ts``, ``blocked_until`` and the learned rate's fields (`broker.adaptive`). A key expires
`IDLE_TTL_S` seconds after its last write, or later if its buckets need longer to refill or its block
lasts longer (and `broker.adaptive.LEARNED_TTL_S` after a model's last call, once calls report their
outcome), so unused models leave nothing behind.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from broker.adaptive import ADAPTIVE_LUA, BURST_CALLS, LEARNED_TTL_S, Throttle
from memq.errors import StoreUnavailable

__all__ = ["IDLE_TTL_S", "RateLimiter", "Throttle"]

IDLE_TTL_S = 120
"""Seconds an idle model's key lives after its last write (at least until its buckets are full)."""

_LIMITER_LUA = """
local key, op, idle_ms = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x) return string.format('%.6f', x) end

-- A bucket's level now: stored level plus limit/60 per elapsed second, at most limit; missing = full.
local function level(prefix, limit, c)
  local v = redis.call('HMGET', key, prefix .. 'level', prefix .. 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil or ts == nil then return c end
  return math.min(c, lvl + math.max(0, now - ts) * limit / 60)
end

-- A bucket's capacity: `burst_s` seconds of its rate, at least 1.
local function cap(limit, burst_s) return math.max(1, limit * burst_s / 60) end

-- Seconds until a bucket at `lvl` is full again.
local function refill_s(lvl, limit, c) return (c - lvl) * 60 / limit end

-- Make the key live at least max(idle, s) seconds from now; never shorten it.
local function keep(s)
  local ms = math.ceil(math.max(idle_ms, s * 1000))
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

if op == 'acquire' then
  local rpm, tpm, tokens, burst_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local rcap, tcap = cap(rpm, burst_s), cap(tpm, burst_s)
  -- a rate learned from the provider's 429s (broker.adaptive), below the configured one, rules, with a
  -- bucket of one call, or ARGV[8] once the provider showed a long window
  local learned = redis.call('HMGET', key, 'a_rate', 'a_long')
  local learned_rpm = tonumber(learned[1])
  if learned_rpm ~= nil and (rpm == 0 or learned_rpm < rpm) then
    rpm = learned_rpm
    local calls = 1
    if learned[2] then calls = tonumber(ARGV[8]) end
    rcap = math.max(1, math.min(calls, learned_rpm * burst_s / 60))
  end
  local wait = 0
  local blocked = tonumber(redis.call('HGET', key, 'blocked_until'))
  if blocked ~= nil and blocked > now + 1e-9 then wait = blocked - now end
  local r, k = 0, 0
  if rpm > 0 then
    r = level('r_', rpm, rcap)
    if r < 1 - 1e-9 then wait = math.max(wait, (1 - r) * 60 / rpm) end  -- 1e-9: float noise, not budget
  end
  if tpm > 0 then
    k = level('t_', tpm, tcap)
    local need = math.min(tokens, tcap)
    if k < need - 1e-9 then wait = math.max(wait, (need - k) * 60 / tpm) end
  end
  if wait > 0 then return fmt(math.max(wait, 0.000001)) end
  local live = 0
  if rpm > 0 then
    redis.call('HSET', key, 'r_level', fmt(r - 1), 'r_ts', fmt(now))
    live = math.max(live, refill_s(r - 1, rpm, rcap))
  end
  if tpm > 0 then
    redis.call('HSET', key, 't_level', fmt(k - tokens), 't_ts', fmt(now))
    live = math.max(live, refill_s(k - tokens, tpm, tcap))
  end
  if rpm > 0 or tpm > 0 then keep(live) end
  return '0'
elseif op == 'block' then
  local untl = now + tonumber(ARGV[4])
  local cur = tonumber(redis.call('HGET', key, 'blocked_until'))
  if cur == nil or cur < untl then
    redis.call('HSET', key, 'blocked_until', fmt(untl))
    cur = untl
  end
  keep(cur - now)
  return fmt(cur - now)
elseif op == 'adjust' then
  local tpm, delta, burst_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local tcap = cap(tpm, burst_s)
  local k = math.min(tcap, level('t_', tpm, tcap) - delta)
  redis.call('HSET', key, 't_level', fmt(k), 't_ts', fmt(now))
  keep(refill_s(k, tpm, tcap))
  return fmt(k)
end
return redis.error_reply('memq ratelimit: unknown op ' .. tostring(op))
"""


def _check_limit(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return value


class RateLimiter:
    """Per-model request (RPM) and token (TPM) budgets shared by all workers through one Redis.

    Args:
        client: a `redis.Redis` client; every limiter on the same Redis and `key_prefix` shares budgets.
        key_prefix: prefix of the per-model keys (``{key_prefix}:{model}``).
        clock: the time, in seconds, to use instead of Redis's own (``TIME``); for tests, which then
            move time themselves and do not depend on how fast a loaded machine runs. Every limiter
            sharing keys must use the same clock.
    """

    def __init__(self, client: redis.Redis, *, key_prefix: str = "memq:ratelimit",
                 clock: Callable[[], float] | None = None) -> None:
        self._r = client
        self._prefix = key_prefix
        self._clock = clock
        self._script = client.register_script(_LIMITER_LUA)
        self._adaptive = client.register_script(ADAPTIVE_LUA)

    def _key(self, model: str) -> str:
        return f"{self._prefix}:{model}"

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis is unreachable (rate limiter): {type(exc).__name__}") from exc

    def _now(self) -> str:
        return f"{self._clock():.6f}" if self._clock is not None else ""

    def _run(self, model: str, op: str, *args: int | float) -> float:
        with self._mapped():
            raw = self._script(keys=[self._key(model)], args=[op, IDLE_TTL_S * 1000, self._now(), *args])
        return float(raw)

    def _adapt(self, model: str, op: str, rpm: int | None, *args: float) -> Any:
        ceiling = _check_limit("rpm", rpm)
        with self._mapped():
            return self._adaptive(keys=[self._key(model)], args=[op, self._now(), ceiling, LEARNED_TTL_S * 1000, *args])

    def acquire(self, model: str, *, rpm: int | None, tpm: int | None, tokens: int, burst_s: float = 60.0) -> float:
        """Take 1 request and `tokens` tokens from the model's budgets, atomically, if both suffice.

        A request for more tokens than `tpm` waits only until the token bucket is full, then is
        granted and leaves the bucket in debt (see the module docstring).

        Args:
            model: the model name (any string; one budget per name).
            rpm: requests per minute (the request bucket's capacity); None: unlimited. A rate learned
                from the provider's 429s (`throttled`) that is lower, or any when None, rules instead.
            tpm: tokens per minute (the token bucket's capacity); None: unlimited.
            tokens: estimated tokens of the call (prompt plus expected completion), >= 0.
            burst_s: bucket capacity in seconds of budget (60: a whole minute may be spent at once, as
                most providers allow; a few seconds smooth calls for providers with sliding windows).

        Returns:
            0.0 when granted. Otherwise nothing was taken, and the seconds (> 0) to wait before both
            buckets would hold enough and any block has ended; call again after that.

        Raises:
            ValueError: `rpm` or `tpm` is not positive, or `tokens` is negative.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        rpm_n, tpm_n = _check_limit("rpm", rpm), _check_limit("tpm", tpm)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if not 0 < burst_s <= 60:
            raise ValueError(f"burst_s must be in (0, 60], got {burst_s}")
        return self._run(model, "acquire", rpm_n, tpm_n, tokens, burst_s, BURST_CALLS)

    def block(self, model: str, seconds: float) -> None:
        """Refuse all budget for the model for `seconds` from now (Redis time), e.g. after a 429.

        An existing block that ends later is kept.

        Args:
            model: the model name.
            seconds: the provider's ``Retry-After``, in seconds (>= 0).

        Raises:
            ValueError: `seconds` is negative or not finite.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        self._run(model, "block", seconds)

    def record_actual(self, model: str, *, tpm: int | None, estimated: int, actual: int,
                      burst_s: float = 60.0) -> None:
        """Correct the token bucket once a call's real usage is known.

        Takes ``actual - estimated`` more tokens (or gives them back when negative; the bucket never
        exceeds `tpm`). The level may go negative: later callers then wait longer.

        Args:
            model: the model name.
            tpm: tokens per minute, as passed to `acquire`; None (unlimited) does nothing.
            estimated: the tokens passed to `acquire`, >= 0.
            actual: the tokens the provider reported (``usage.total_tokens``), >= 0.

        Raises:
            ValueError: `tpm` is not positive, or a token count is negative.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        tpm_n = _check_limit("tpm", tpm)
        if estimated < 0 or actual < 0:
            raise ValueError(f"token counts must be >= 0, got estimated={estimated} actual={actual}")
        if tpm_n == 0 or actual == estimated:
            return
        self._run(model, "adjust", tpm_n, actual - estimated, burst_s)

    def throttled(self, model: str, *, sent_s_ago: float, rpm: int | None) -> Throttle:
        """React to a provider's 429 without ``Retry-After``: lower the model's learned rate and pause it,
        for every worker (`broker.adaptive`), once per congestion event.

        Args:
            model: the model name (its budget).
            sent_s_ago: seconds since the refused call was sent (measured by the caller, >= 0): a call
                sent before the last reaction was part of the congestion already reacted to.
            rpm: the configured requests per minute (the learned rate never exceeds it); None: none.

        Returns:
            The pause left (seconds), the learned rate now, and whether this 429 changed anything.

        Raises:
            ValueError: `rpm` is not positive or `sent_s_ago` is negative or not finite.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        if not math.isfinite(sent_s_ago) or sent_s_ago < 0:
            raise ValueError(f"sent_s_ago must be finite and >= 0, got {sent_s_ago}")
        pause, rate, reacted = self._adapt(model, "throttled", rpm, sent_s_ago)
        return Throttle(pause_s=float(pause), learned_rpm=_rate(rate), reacted=bool(int(reacted)))

    def succeeded(self, model: str, *, sent_s_ago: float = 0.0, rpm: int | None) -> float | None:
        """Record a successful call of the model: counted in the achieved rate, ends a run of 429s, and
        raises a learned rate by `broker.adaptive.STEP_RPM` while it is being used (a call sent before
        the last 429's reaction is counted in what that reaction measured instead).

        Args:
            model: the model name (its budget).
            sent_s_ago: seconds since the call was sent (measured by the caller, >= 0).
            rpm: the configured requests per minute (a learned rate reaching it is dropped); None: none.

        Returns:
            The learned requests per minute now, or None (none learned, or the configured rate rules).

        Raises:
            ValueError: `rpm` is not positive or `sent_s_ago` is negative or not finite.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        if not math.isfinite(sent_s_ago) or sent_s_ago < 0:
            raise ValueError(f"sent_s_ago must be finite and >= 0, got {sent_s_ago}")
        return _rate(self._adapt(model, "succeeded", rpm, sent_s_ago))

    def learned_rpm(self, model: str) -> float | None:
        """The model's learned requests per minute, or None when it has none (`broker.adaptive`).

        Raises:
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        return _rate(self._adapt(model, "learned", None))


def _rate(raw: bytes | str) -> float | None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return float(text) if text else None

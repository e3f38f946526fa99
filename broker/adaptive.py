"""A model's request rate learned from the provider's 429s, shared through Redis by every worker.

A provider that answers 429 without ``Retry-After`` says "too many" but not how many is right nor
when to come back. Retrying on a timer spends attempts (a one-minute window outlasts any sane
backoff); so memq learns the limit instead, the way TCP learns a path's capacity from lost packets.

**Decrease (on a 429).** TCP's congestion avoidance (Jacobson 1988, RFC 5681) halves its window on a
loss: additive increase, multiplicative decrease (AIMD) converges, but a sender that halves spends
on average only about 3/4 of the capacity. memq instead decreases to a fraction (`DECREASE`, 0.9) of
the rate its calls *actually achieved* when the 429 came, which is the provider's limit: against a
sliding one-minute window, the successful calls of the last minute number exactly the limit at the
moment one more is refused (BBR, Cardwell et al. 2016, likewise paces at the delivery rate it
measured rather than at a fraction of what it tried to send). The achieved rate is counted in 60
one-second buckets (successes of the last minute, per minute); before a minute of history exists it
is taken over the time since the first recorded success (at least 1 s), so a provider with a short
window (10 per second, say) is learned at its own rate rather than at what a few seconds would
suggest. A 429 never raises the rate, a 429 with no success in the last minute leaves it as it is
(nothing to measure), and the rate never goes below `FLOOR_RPM` nor above the configured
``MEMQ_LLM__RPM`` (a ceiling, when set).

**One reaction per congestion event.** Like TCP NewReno, which cuts its window once per window of
lost data, memq reacts once: a 429 for a call sent before the last reaction (the other calls that were
in flight at the same time) changes nothing.

**Pause.** Each reaction also blocks the model for every worker (`blocked_until`, as a Retry-After
does): `PAUSE_S` (1 s) after a 429 that follows a success, doubling with each further reaction
without a success in between, up to `PAUSE_MAX_S` (30 s). A full one-minute window frees its first
slot only after up to a minute: the doubling pauses span it in 6 reactions instead of a storm of
429s.

**Increase (while calls succeed).** Each successful call adds `STEP_RPM` (0.05 requests per minute)
to the learned rate: at R calls a minute that is R/20 per minute, so the rate climbs back from 0.9 R
to R in about two minutes whatever R is, probing slowly for more room (TCP adds one segment per round
trip the same way). It grows only while memq uses it (the achieved rate at least `USED` of it), as
TCP grows its window only when the sender fills it (congestion window validation, RFC 7661), so an
idle hour does not grow it into a burst. A learned rate that reaches the configured ceiling is
dropped: the ceiling rules again.

**Pacing.** The learned rate is enforced by the token bucket of `broker.ratelimit` with a bucket of
`BURST_S` (0.1 s) of budget, at least one request: calls are evenly spaced instead of spending a
minute's budget at once, which a sliding-window provider refuses at the start of every window, and a
provider with a short window (a second) sees no bursts above the rate. (In a simulation of a
10-per-second provider, a 1 s bucket settled at 55-65% of the limit, 0.1 s at 93%.)

With no ``MEMQ_LLM__RPM`` the model starts unlimited and has a learned rate only after its first
429. A learned rate is forgotten `LEARNED_TTL_S` (1 h) after the model's last call; the next 429
starts again. A 429 with ``Retry-After`` is not learned from: the provider said when, and the
block of `broker.ratelimit` obeys it.

Fields of the model's hash (``{key_prefix}:{model}``, shared with `broker.ratelimit`): ``a_rate``
(learned requests per minute; absent: none), ``a_event`` (Redis time of the last reaction),
``a_streak`` (reactions since the last success), ``a_since`` (time of the first recorded success),
``c0``..``c59`` and ``k0``..``k59`` (successes per second and that second, by second mod 60), and
``blocked_until``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BURST_S", "DECREASE", "FLOOR_RPM", "LEARNED_TTL_S", "PAUSE_MAX_S", "PAUSE_S", "STEP_RPM", "USED",
           "ADAPTIVE_LUA", "Throttle"]

DECREASE = 0.9
"""On a 429 the learned rate becomes this fraction of the rate achieved over the last minute."""
STEP_RPM = 0.05
"""Requests per minute each successful call adds to the learned rate."""
USED = 0.8
"""The learned rate grows only while the achieved rate is at least this fraction of it."""
PAUSE_S = 1.0
"""Seconds every worker waits after a 429 that follows a success (doubling on each further reaction)."""
PAUSE_MAX_S = 30.0
"""Longest pause after a 429 (seconds)."""
FLOOR_RPM = 1.0
"""The learned rate never goes below this (requests per minute)."""
BURST_S = 0.1
"""Seconds of budget the learned rate's bucket holds (the configured ``burst_s`` when it is smaller)."""
LEARNED_TTL_S = 3600
"""Seconds a model's learned state lives after its last call."""
WINDOW_S = 60
"""Seconds over which the achieved rate is counted (one-second buckets)."""


@dataclass(frozen=True)
class Throttle:
    """What a 429 did to a model's shared state.

    Attributes:
        pause_s: seconds until the model may be called again (0: the pause has already ended).
        learned_rpm: the learned requests per minute now, or None (unlimited, or the ceiling rules).
        reacted: False when the 429 belonged to a congestion event already reacted to (nothing changed).
    """

    pause_s: float
    learned_rpm: float | None
    reacted: bool


# KEYS: the model's hash. ARGV: op ('throttled' | 'succeeded' | 'learned'), now ('' = Redis TIME), ceiling
# rpm (0: none), ttl (ms), then for 'throttled': seconds since the refused call was sent.
# Returns {pause_s, learned rpm ('' = none), reacted (1/0)} for 'throttled', the learned rpm ('' = none) else.
ADAPTIVE_LUA = f"""
local key, op = KEYS[1], ARGV[1]
local now = tonumber(ARGV[2])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local ceiling, ttl_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local WINDOW, DECREASE, STEP, USED = {WINDOW_S}, {DECREASE}, {STEP_RPM}, {USED}
local PAUSE, PAUSE_MAX, FLOOR = {PAUSE_S}, {PAUSE_MAX_S}, {FLOOR_RPM}

local function fmt(x) return string.format('%.6f', x) end
local function keep(ms)
  ms = math.ceil(math.max(ttl_ms, ms))
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- Successful calls of the last minute, and that count per minute (over the time since the first
-- recorded success when that is shorter, at least 1 s).
local function achieved()
  local sec = math.floor(now)
  local fields = {{}}
  for i = 0, WINDOW - 1 do
    fields[#fields + 1] = 'c' .. i
    fields[#fields + 1] = 'k' .. i
  end
  local v = redis.call('HMGET', key, unpack(fields))
  local n = 0
  for i = 0, WINDOW - 1 do
    local c, k = tonumber(v[2 * i + 1]), tonumber(v[2 * i + 2])
    if c ~= nil and k ~= nil and k > sec - WINDOW then n = n + c end
  end
  local since = tonumber(redis.call('HGET', key, 'a_since')) or now
  local span = math.min(WINDOW, math.max(1, now - since))
  return n, n * 60 / span
end

local rate = tonumber(redis.call('HGET', key, 'a_rate'))
local function shown(r) if r == nil then return '' end return fmt(r) end

if op == 'learned' then
  return shown(rate)
elseif op == 'succeeded' then
  local sec = math.floor(now)
  local i = sec % WINDOW
  if tonumber(redis.call('HGET', key, 'k' .. i)) == sec then
    redis.call('HINCRBY', key, 'c' .. i, 1)
  else
    redis.call('HSET', key, 'c' .. i, 1, 'k' .. i, sec)
  end
  redis.call('HSETNX', key, 'a_since', fmt(now))
  redis.call('HDEL', key, 'a_streak')
  if rate ~= nil then
    local _, per_min = achieved()
    if per_min >= USED * rate then rate = rate + STEP end
    if ceiling > 0 and rate >= ceiling then
      redis.call('HDEL', key, 'a_rate')
      rate = nil
    else
      redis.call('HSET', key, 'a_rate', fmt(rate))
    end
  end
  keep(0)
  return shown(rate)
elseif op == 'throttled' then
  local sent = now - tonumber(ARGV[5])
  local h = redis.call('HMGET', key, 'a_event', 'blocked_until', 'a_streak')
  local event, blocked, streak = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if event ~= nil and sent < event then
    return {{fmt(math.max(0, blocked - now)), shown(rate), 0}}
  end
  streak = streak + 1
  local pause = math.min(PAUSE_MAX, PAUSE * 2 ^ (streak - 1))
  local n, per_min = achieved()
  if n > 0 then
    local target = math.max(FLOOR, DECREASE * per_min)
    if rate == nil or target < rate then rate = target end
  end
  if rate ~= nil and ceiling > 0 and rate >= ceiling then rate = nil end
  blocked = math.max(blocked, now + pause)
  redis.call('HSET', key, 'a_event', fmt(now), 'a_streak', streak, 'blocked_until', fmt(blocked))
  if rate ~= nil then redis.call('HSET', key, 'a_rate', fmt(rate)) else redis.call('HDEL', key, 'a_rate') end
  keep((blocked - now) * 1000)
  return {{fmt(blocked - now), shown(rate), 1}}
end
return redis.error_reply('memq adaptive rate: unknown op ' .. tostring(op))
"""

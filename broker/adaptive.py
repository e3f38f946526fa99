"""A model's request rate learned from the provider's 429s, shared through Redis by every worker.

A provider that answers 429 without ``Retry-After`` says "too many" but not how many is right nor
when to come back. Retrying on a timer spends attempts (a one-minute window outlasts any sane
backoff); so memq learns the limit instead, the way TCP learns a path's capacity from lost packets.

**Decrease (on a 429).** TCP's congestion avoidance (Jacobson 1988, RFC 5681) halves its window on a
loss: additive increase, multiplicative decrease (AIMD) converges, but a sender that halves spends
on average only about 3/4 of the capacity. memq decreases to a fraction (`DECREASE`, 0.95) of the rate
its calls *actually achieved* when the 429 came, which is the provider's limit: against a sliding
one-minute window, the successful calls of the last minute number exactly the limit at the moment one
more is refused (BBR, Cardwell et al. 2016, likewise paces at the delivery rate it measured rather than
at a fraction of what it tried to send). When the learned rate was in use (calls went at about its
pace) the provider refused that pace itself, so the decrease is from it. The achieved rate is counted
in 60 one-second buckets (successes of the last minute, per minute); before a minute of history exists
it is taken over the time since the first recorded success less memq's own pauses (at least 1 s), so a
provider with a short window (2 a second, say) is learned at its own rate rather than at what a few
seconds with a pause in them suggest. A 429 never raises the rate, and the rate never goes below
`FLOOR_RPM` nor above the configured ``MEMQ_LLM__RPM`` (a ceiling, when set).

**A 429 with nothing to measure** (no success in the last minute: another client filled the
provider's window, or its limit is per hour or per day) halves what is allowed now: the learned rate,
else the configured ceiling, else it starts at `PROBE_RPM`; down to `FLOOR_RPM`. Without it the rate
would stay unlimited and every pause would end in a burst of the whole backlog; with it, each pause
ends with one call at a rate halved at each refusal, so a provider that refuses everything for an hour
sees about one call a minute, and the first successes measure a rate again.

**One reaction per congestion event.** Like TCP NewReno, which cuts its window once per window of
lost data, memq reacts once: a 429 for a call sent before the last reaction's pause ended (the other
calls in flight at the same time, or one that took its budget just before the pause began) changes
nothing. Symmetrically, a success of a call sent before the reaction belongs to the span it measured:
when many calls were in flight, the 429 may be answered before the successes sent with it, so the rate
is measured again with each of them (never above the rate before the 429).

**Pause.** Each reaction also blocks the model for every worker (``blocked_until``, as a Retry-After
does): `PAUSE_S` (1 s) after a 429 that follows a success, doubling with each further reaction
without a success in between, up to `PAUSE_MAX_S` (30 s). A full one-minute window frees its first
slot only after up to a minute: the doubling pauses span it in 6 reactions instead of a storm of 429s.
When 429s outlasted a pause (the provider's window is longer than it), the first success after them
sets the rate from the whole stretch: the provider let the calls counted at the first 429 through, and
no other until now, so its rate is at most that many over the time since the first of them (taken
over a minute at most). Without this, a cold start against a one-minute window resumes at the rate
measured over the first seconds (60 calls in 9 s: 400 a minute) and fills the window again.

**Increase (while calls succeed).** Each successful call adds `STEP_RPM` (0.05 requests per minute)
to the learned rate: at R calls a minute that is R/20 per minute, so the rate climbs back from 0.95 R
to R in about a minute whatever R is, probing slowly for more room (TCP adds one segment per round
trip the same way); the sawtooth between 0.95 R and R averages about 0.97 R. The step is multiplied by the minutes since the last 429 (at least 1, at most
`PROBE_MAX`), as CUBIC (RFC 9438) grows its window faster the longer since its last loss: a rate that
holds without 429s was probably learned too low (or the provider raised its limit). It grows only
while memq uses it (the achieved rate at least `USED` of it), as TCP grows its window only when the
sender fills it (congestion window validation, RFC 7661), so an idle hour does not grow it into a
burst. A learned rate that reaches the configured ceiling is dropped: the ceiling rules again.

**Pacing.** The learned rate is enforced by the token bucket of `broker.ratelimit` with a bucket of
one call: calls are evenly spaced instead of spending a minute's budget at once, which a sliding-window
provider refuses at the start of every window, and a provider with a short window (a second) sees no
burst above the rate (in a simulation of a 10-per-second provider, a bucket of a second of budget
settled at 55-65% of the limit, one call at over 90%). Once the provider has shown a window longer than
a pause (429s that outlasted one), the bucket holds `BURST_CALLS` (2): one call of burst is within the
margin of such a window, and it keeps a token that came while no task was ready (a stage's calls come
in clumps: in `bench/throughput.py` runs, one call used 83-93% of the learned rate a minute, two 88-98%).

With no ``MEMQ_LLM__RPM`` the model starts unlimited and has a learned rate only after its first
429. A learned rate is forgotten `LEARNED_TTL_S` (1 h) after the model's last call; the next 429
starts again. A 429 with ``Retry-After`` is not learned from: the provider said when, and the
block of `broker.ratelimit` obeys it.

Simulated against the LLM test server's sliding window with this module's script on a real Redis and
a hand-moved clock (8 workers, 300 ms calls, unlimited demand; the pipeline's own figures come from
`bench/throughput.py`): a 60 per minute window is used at 0.98 of its limit from the third minute on
(cold start: 60, then 57 calls in the second minute), 600 per minute at 0.99, 2 and 10 per second at
0.96-0.98; over the second half of 2 to 4 minute runs, 0.958 in each of 10 random orders of the calls
that finish at the same instant, for each of the three.

Fields of the model's hash (``{key_prefix}:{model}``, shared with `broker.ratelimit`): ``a_rate``
(learned requests per minute; absent: none), ``a_event`` and ``a_until`` (Redis time of the last
reaction and the end of its pause), ``a_streak`` (reactions since the last success), ``a_n``, ``a_t0``
and ``a_prev`` (successes counted at a run's first 429, since when, and the rate before it), ``a_long``
(the provider showed a window longer than a pause), ``a_since`` (time of the first recorded success),
``a_paused`` (seconds paused since then), ``c0``..``c59`` and ``k0``..``k59`` (successes per second and
that second, by second mod 60), and ``blocked_until``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BURST_CALLS", "DECREASE", "FLOOR_RPM", "LEARNED_TTL_S", "PAUSE_MAX_S", "PAUSE_S", "PROBE_MAX", "PROBE_RPM",
           "STEP_RPM", "USED", "ADAPTIVE_LUA", "Throttle"]

DECREASE = 0.95
"""On a 429 the learned rate becomes this fraction of the rate achieved over the last minute (of the learned
rate itself when it was in use)."""
STEP_RPM = 0.05
"""Requests per minute each successful call adds to the learned rate."""
PROBE_MAX = 4
"""A success adds `STEP_RPM` times the minutes since the last 429 (at least 1, at most this)."""
USED = 0.8
"""The learned rate grows only while the achieved rate is at least this fraction of it."""
PAUSE_S = 1.0
"""Seconds every worker waits after a 429 that follows a success (doubling on each further reaction)."""
PAUSE_MAX_S = 30.0
"""Longest pause after a 429 (seconds)."""
FLOOR_RPM = 1.0
"""The learned rate never goes below this (requests per minute)."""
PROBE_RPM = 60.0
"""Requests per minute a model with no learned rate and no ceiling starts at after a 429 with nothing to
measure (no success in the last minute); each such 429 after it halves the rate."""
BURST_CALLS = 2
"""Calls the learned rate's bucket holds once the provider showed a window longer than a pause (before:
1); never more than ``burst_s`` seconds of the rate, nor less than 1."""
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
# rpm (0: none), ttl (ms), then for 'throttled' and 'succeeded': seconds since the call was sent.
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
local PAUSE, PAUSE_MAX, FLOOR, PROBE_MAX, PROBE_RPM = {PAUSE_S}, {PAUSE_MAX_S}, {FLOOR_RPM}, {PROBE_MAX}, {PROBE_RPM}

local function fmt(x) return string.format('%.6f', x) end
local function keep(ms)
  ms = math.ceil(math.max(ttl_ms, ms))
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

-- Successful calls of the last minute, that count per minute, and the span (s) it was taken over: a
-- minute, or when the first recorded success is more recent, the time since it less the pauses since
-- (memq sent nothing then), at least 1 s.
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
  local h = redis.call('HMGET', key, 'a_since', 'a_paused')
  local elapsed = now - (tonumber(h[1]) or now)
  local span = WINDOW
  if elapsed < WINDOW then span = math.max(1, elapsed - (tonumber(h[2]) or 0)) end
  return n, n * 60 / span, span
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
  local sent = now - tonumber(ARGV[5])
  local r = redis.call('HMGET', key, 'a_streak', 'a_n', 'a_t0', 'a_event', 'a_prev')
  local streak, n0, t0, event = tonumber(r[1]) or 0, tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
  if n0 ~= nil and t0 ~= nil and event ~= nil and sent < event then
    -- a call sent before the last reaction: it belongs to the span that reaction measured, so the rate
    -- is measured again with it (as if its answer had come first), never above the rate before the 429
    n0 = n0 + 1
    redis.call('HSET', key, 'a_n', n0)
    local target = DECREASE * n0 * 60 / math.max(1, event - t0)
    local prev = tonumber(r[5])
    if rate ~= nil and target > rate then
      rate = target
      if prev ~= nil then rate = math.min(rate, prev) end
      if ceiling > 0 and rate >= ceiling then rate = nil end
      if rate ~= nil then redis.call('HSET', key, 'a_rate', fmt(rate)) else redis.call('HDEL', key, 'a_rate') end
    end
    keep(0)
    return shown(rate)
  end
  redis.call('HDEL', key, 'a_streak', 'a_n', 'a_t0', 'a_prev')
  if streak >= 2 and n0 ~= nil and t0 ~= nil then
    redis.call('HSET', key, 'a_long', 1)
    -- the first success after 429s that outlasted a pause (the provider's window is longer than it):
    -- the provider let n0 calls through since t0 and none since but this one, so its rate is taken
    -- over that whole time
    local target = math.max(FLOOR, DECREASE * (n0 + 1) * 60 / math.min(WINDOW, math.max(1, now - t0)))
    if (rate ~= nil and target < rate) or (rate == nil and ceiling > 0 and target < ceiling) then rate = target end
  elseif rate ~= nil then
    local _, per_min = achieved()
    if per_min >= USED * rate then
      -- the longer since the last 429, the faster it probes (one step per minute since, up to PROBE_MAX)
      local since_429 = now - (tonumber(redis.call('HGET', key, 'a_event')) or now)
      rate = rate + STEP * math.min(PROBE_MAX, math.max(1, since_429 / WINDOW))
    end
  end
  if rate ~= nil then
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
  local h = redis.call('HMGET', key, 'a_until', 'blocked_until', 'a_streak')
  local reacted_until, blocked, streak = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if reacted_until ~= nil and sent < reacted_until then
    return {{fmt(math.max(0, blocked - now)), shown(rate), 0}}
  end
  streak = streak + 1
  local pause = math.min(PAUSE_MAX, PAUSE * 2 ^ (streak - 1))
  local n, per_min, span = achieved()
  if n > 0 then
    local prev = rate
    -- a rate in use (calls went at about its pace) was refused itself; otherwise what went through counts
    local in_use = rate ~= nil and per_min >= USED * rate
    local basis = per_min
    if in_use then basis = math.max(per_min, rate) end
    local target = math.max(FLOOR, DECREASE * basis)
    if rate == nil or target < rate then rate = target end
    if streak == 1 and not in_use then
      -- what this reaction measured: n calls since t0 (later answers of calls sent before now add to it)
      redis.call('HSET', key, 'a_n', n, 'a_t0', fmt(now - span), 'a_prev', shown(prev))
    end
  else
    -- nothing went through in the last minute, so nothing to measure: halve what is allowed now (the
    -- learned rate, else the ceiling), or start at PROBE_RPM, so the calls after the pause come one at a
    -- time at a rate instead of all at once
    local allowed = rate
    if allowed == nil and ceiling > 0 then allowed = ceiling end
    if allowed == nil then rate = PROBE_RPM else rate = math.max(FLOOR, allowed / 2) end
  end
  if rate ~= nil and ceiling > 0 and rate >= ceiling then rate = nil end
  local paused = math.max(0, now + pause - math.max(blocked, now))
  blocked = math.max(blocked, now + pause)
  redis.call('HSET', key, 'a_event', fmt(now), 'a_until', fmt(now + pause), 'a_streak', streak,
             'blocked_until', fmt(blocked))
  redis.call('HINCRBYFLOAT', key, 'a_paused', paused)
  if rate ~= nil then redis.call('HSET', key, 'a_rate', fmt(rate)) else redis.call('HDEL', key, 'a_rate') end
  keep((blocked - now) * 1000)
  return {{fmt(blocked - now), shown(rate), 1}}
end
return redis.error_reply('memq adaptive rate: unknown op ' .. tostring(op))
"""

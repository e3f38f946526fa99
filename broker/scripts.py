"""The Lua scripts behind `broker.jobstore`: each change of a job's state is one of them, so it is atomic
(Redis runs a script without interleaving) and done in one round trip.

Every script but ENQUEUE first checks that the job exists and has not finished (``"missing"`` /
``"finished"``); every one may run twice safely (a reply lost with the connection is retried).
`ADVANCE` is prepended to each: it marks a sequence number of a scope done, moves ``applied`` over
contiguous done numbers, and pushes the decide of the job whose turn it now is. It also defines `note`:
every change of a live job stamps ``memq:jobs:touched`` (job id -> Redis server time, epoch seconds) and,
when it queues tasks for the job, keeps their names, attempt numbers and queues in the job's ``next`` field, so
that `broker.lost` can tell a job whose task message vanished and `RESCUE` can queue it again.
"""

TOUCHED_KEY = "memq:jobs:touched"
"""Sorted set: unfinished job id -> the Redis server time (epoch seconds) of its last change."""

ADVANCE = """
local function advance(scope, seq)
  local base = 'memq:scope:' .. scope
  local applied = tonumber(redis.call('GET', base .. ':applied') or '0')
  if seq <= applied then return applied end
  redis.call('SADD', base .. ':done', seq)
  local moved = false
  while redis.call('SREM', base .. ':done', tostring(applied + 1)) == 1 do
    applied = applied + 1
    redis.call('HDEL', base .. ':order', applied)
    moved = true
  end
  if moved then
    redis.call('SET', base .. ':applied', applied)
    local nxt = tostring(applied + 1)
    local wake = redis.call('HMGET', base .. ':waiting', nxt, nxt .. ':q')
    if wake[1] and wake[2] then
      -- RPUSH: kombu consumes with BRPOP from the right, so the woken decide runs next in its queue
      -- (its scope has been waiting for it), instead of behind every queued extraction
      redis.call('RPUSH', wake[2], wake[1])
      redis.call('HDEL', base .. ':waiting', nxt, nxt .. ':q')
    end
  end
  return applied
end
local function finished(status) return status == 'succeeded' or status == 'failed' end
-- stamp job `id` with the time and keep the tasks of `msgs`, the messages queued for it now (may be empty)
local function stamp(id, msgs)
  local t = redis.call('TIME')
  redis.call('ZADD', 'memq:jobs:touched', tonumber(t[1]) + tonumber(t[2]) / 1000000, id)
  if #msgs > 0 then
    local tasks = {}
    for i, m in ipairs(msgs) do
      local e = cjson.decode(m)
      local eta = e.headers.eta
      if type(eta) ~= 'string' then eta = '' end
      tasks[i] = {e.headers.task, e.headers.retries or 0, e.properties.delivery_info.routing_key, eta}
    end
    redis.call('HSET', 'memq:job:' .. id, 'next', cjson.encode(tasks))
  end
end
-- a change of job `id` made by one of its tasks: progress, so its rescues start again from none
local function note(id, msgs)
  stamp(id, msgs)
  redis.call('HDEL', 'memq:job:' .. id, 'rescues')
end
"""

# ARGV: now (ISO), now (epoch s), replay flag, then per job: id, request JSON, queue, message, scope key,
#       scope ids JSON, idempotency slot ("" for none)
ENQUEUE = ADVANCE + """
local now, epoch, replay = ARGV[1], ARGV[2], ARGV[3] == '1'
local out = {}
local n = (#ARGV - 3) / 7
for i = 0, n - 1 do
  local b = 4 + i * 7
  local id, req, queue, msg, scope, ids, idem = ARGV[b], ARGV[b+1], ARGV[b+2], ARGV[b+3], ARGV[b+4], ARGV[b+5], ARGV[b+6]
  local jk = 'memq:job:' .. id
  local existing = false
  if replay then
    local h = redis.call('HMGET', jk, 'scope', 'seq')
    if h[1] and h[2] then advance(h[1], tonumber(h[2])) end
    redis.call('DEL', jk .. ':steps', jk .. ':written')
    redis.call('HDEL', jk, 'error', 'error_type', 'results', 'counts', 'relations', 'images', 'warnings', 'stage', 'waiting', 'deferrals', 'rescues', 'next', 'rate_limited_since')
    for _, stage in ipairs({'caption', 'extract', 'decide', 'write_vectors', 'write_graph'}) do
      redis.call('PERSIST', jk .. ':stage:' .. stage)
    end
    redis.call('PERSIST', jk)
    if idem ~= '' then redis.call('PERSIST', idem) end
  elseif idem ~= '' then
    existing = redis.call('GET', idem)
    if not existing then redis.call('SET', idem, id) end
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 0
  else
    redis.call('SET', jk .. ':request', req)
    local seq = redis.call('INCR', 'memq:scope:' .. scope .. ':seq')
    redis.call('HSET', 'memq:scope:' .. scope .. ':order', seq, id)
    local fields = {'status', 'queued', 'updated_at', now, 'seq', seq, 'scope', scope, 'ids', ids, 'idem', idem}
    if replay then
      redis.call('HSETNX', jk, 'created_at', now)
    else
      fields[#fields + 1] = 'created_at'
      fields[#fields + 1] = now
    end
    redis.call('HSET', jk, unpack(fields))
    redis.call('ZADD', 'memq:jobs:live', epoch, id)
    redis.call('LPUSH', queue, msg)
    stamp(id, {msg})
    out[#out + 1] = id
    out[#out + 1] = 1
  end
end
return out
"""

# ARGV: id, now, stage label, output name, output JSON, marker, n, then n (queue, message) pairs
STEP = ADVANCE + """
local id, now, label, out_name, out_json, marker = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local jk = 'memq:job:' .. id
local status = redis.call('HGET', jk, 'status')
if not status then return 'missing' end
if finished(status) then return 'finished' end
if out_name ~= '' then redis.call('SET', jk .. ':stage:' .. out_name, out_json, 'NX') end
local push = true
if marker ~= '' then push = redis.call('HSETNX', jk .. ':steps', marker, '1') == 1 end
local pushed = {}
if push then
  for i = 0, tonumber(ARGV[7]) - 1 do
    redis.call('LPUSH', ARGV[8 + 2 * i], ARGV[9 + 2 * i])
    pushed[#pushed + 1] = ARGV[9 + 2 * i]
  end
end
note(id, pushed)
local fields = {'updated_at', now}
if label ~= '' then fields[#fields + 1] = 'stage'; fields[#fields + 1] = label end
if status == 'queued' then fields[#fields + 1] = 'status'; fields[#fields + 1] = 'running' end
redis.call('HSET', jk, unpack(fields))
redis.call('HDEL', jk, 'waiting')
if push then
  redis.call('HDEL', jk, 'rate_limited_since')  -- a stage finished: the rate-limit clock starts again
  return 'ok'
end
return 'done-before'  -- a duplicate delivery of a done stage leaves the next stage's clock alone
"""

# ARGV: id, now, write name, output JSON, expected writes, finalize queue, finalize message
JOIN = ADVANCE + """
local id, now, write, out_json, expected = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local jk = 'memq:job:' .. id
local status = redis.call('HGET', jk, 'status')
if not status then return 'missing' end
if finished(status) then return 'finished' end
redis.call('SET', jk .. ':stage:' .. write, out_json, 'NX')
redis.call('SADD', jk .. ':written', write)
redis.call('HSET', jk, 'updated_at', now)
if redis.call('SCARD', jk .. ':written') >= expected and redis.call('HSETNX', jk .. ':steps', 'finalize', '1') == 1 then
  redis.call('LPUSH', ARGV[6], ARGV[7])
  note(id, {ARGV[7]})
  return 'joined'
end
note(id, {})
return 'ok'
"""

# ARGV: id, now, wake queue, wake message (no countdown), backstop queue, backstop message, text
DEFER = ADVANCE + """
local id, now = ARGV[1], ARGV[2]
local jk = 'memq:job:' .. id
local h = redis.call('HMGET', jk, 'status', 'scope', 'seq')
if not h[1] then return 'missing' end
if finished(h[1]) then return 'finished' end
local base = 'memq:scope:' .. h[2]
local seq = tonumber(h[3])
local applied = tonumber(redis.call('GET', base .. ':applied') or '0')
if applied >= seq then return 'stale' end
if applied == seq - 1 then
  redis.call('RPUSH', ARGV[3], ARGV[4])
  note(id, {ARGV[4]})
  return 'now'
end
redis.call('HSET', base .. ':waiting', tostring(seq), ARGV[4], tostring(seq) .. ':q', ARGV[3])
redis.call('LPUSH', ARGV[5], ARGV[6])
note(id, {ARGV[6]})
local blocker = redis.call('HGET', base .. ':order', tostring(applied + 1)) or '?'
local text = string.format(ARGV[7], seq - 1 - applied, blocker)
redis.call('HSET', jk, 'waiting', text, 'updated_at', now)
redis.call('HINCRBY', jk, 'deferrals', 1)
return 'deferred'
"""

# ARGV: id, now, stage label, error, error type, status ('' keeps it), queue, message
RETRY = ADVANCE + """
local id, now = ARGV[1], ARGV[2]
local jk = 'memq:job:' .. id
local status = redis.call('HGET', jk, 'status')
if not status then return 'missing' end
if finished(status) then return 'finished' end
local fields = {'updated_at', now}
if ARGV[3] ~= '' then fields[#fields + 1] = 'stage'; fields[#fields + 1] = ARGV[3] end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = 'error_type'; fields[#fields + 1] = ARGV[5]
end
if ARGV[6] ~= '' then fields[#fields + 1] = 'status'; fields[#fields + 1] = ARGV[6] end
redis.call('HSET', jk, unpack(fields))
redis.call('LPUSH', ARGV[7], ARGV[8])
note(id, {ARGV[8]})
return 'ok'
"""

# ARGV: id, now, status, results, counts, relations, error, error type, stage label, ttl (s), terminal ('1'/'0'),
#       images, warnings (JSON), then an optional (queue, message) to push (a retry of a partial job's write)
FINISH = ADVANCE + """
local id, now, status, ttl, terminal = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[10]), ARGV[11] == '1'
local jk = 'memq:job:' .. id
local h = redis.call('HMGET', jk, 'status', 'scope', 'seq', 'idem')
if not h[1] then return 'missing' end
if finished(h[1]) then return 'finished' end
local fields = {'status', status, 'updated_at', now, 'stage', ARGV[9]}
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'results'; fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = 'counts'; fields[#fields + 1] = ARGV[5]
  fields[#fields + 1] = 'relations'; fields[#fields + 1] = ARGV[6]
  fields[#fields + 1] = 'images'; fields[#fields + 1] = ARGV[12]
  fields[#fields + 1] = 'warnings'; fields[#fields + 1] = ARGV[13]
end
if ARGV[7] ~= '' then
  fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[7]
  fields[#fields + 1] = 'error_type'; fields[#fields + 1] = ARGV[8]
else
  redis.call('HDEL', jk, 'error', 'error_type')
end
redis.call('HSET', jk, unpack(fields))
redis.call('HDEL', jk, 'waiting')
if h[2] and h[3] then advance(h[2], tonumber(h[3])) end
if ARGV[14] then redis.call('LPUSH', ARGV[14], ARGV[15]) end
if terminal then
  redis.call('ZREM', 'memq:jobs:touched', id)
else
  note(id, ARGV[14] and {ARGV[15]} or {})
end
if terminal then
  local keys = {jk, jk .. ':request', jk .. ':steps', jk .. ':written'}
  for _, stage in ipairs({'caption', 'extract', 'decide', 'write_vectors', 'write_graph'}) do
    keys[#keys + 1] = jk .. ':stage:' .. stage
  end
  if h[4] and h[4] ~= '' then keys[#keys + 1] = h[4] end
  for _, k in ipairs(keys) do redis.call('EXPIRE', k, ttl) end
  redis.call('ZREM', 'memq:jobs:live', id)
end
return 'ok'
"""

# ARGV: id, now, the job's touched score as read (bytes), most rescues, n, then n (queue, message) pairs.
# Queue a lost job's next tasks again, unless it changed since the sweep read it (compare and push); with
# no task to queue (none recorded) or too many rescues without progress in between, answer 'exhausted'.
RESCUE = ADVANCE + """
local id, now = ARGV[1], ARGV[2]
local jk = 'memq:job:' .. id
local status = redis.call('HGET', jk, 'status')
if not status or finished(status) then
  redis.call('ZREM', 'memq:jobs:touched', id)
  return status and 'finished' or 'missing'
end
if redis.call('ZSCORE', 'memq:jobs:touched', id) ~= ARGV[3] then return 'moved' end
if tonumber(ARGV[5]) == 0 or redis.call('HINCRBY', jk, 'rescues', 1) > tonumber(ARGV[4]) then return 'exhausted' end
local pushed = {}
for i = 0, tonumber(ARGV[5]) - 1 do
  -- RPUSH: next out of its queue (its job has waited long enough)
  redis.call('RPUSH', ARGV[6 + 2 * i], ARGV[7 + 2 * i])
  pushed[#pushed + 1] = ARGV[7 + 2 * i]
end
stamp(id, pushed)
redis.call('HSET', jk, 'updated_at', now)
return 'ok'
"""

# ARGV: id. Seconds since the job's current stage was first rate-limited (Redis time); the first call
# for a stage stamps the job and answers 0 (STEP, a finished stage, clears the stamp). A job that has no
# record or has finished answers 0 and is not stamped.
RATE_LIMITED = """
local jk = 'memq:job:' .. ARGV[1]
local status = redis.call('HGET', jk, 'status')
if not status or status == 'succeeded' or status == 'failed' then return '0' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local since = tonumber(redis.call('HGET', jk, 'rate_limited_since'))
if since == nil then
  redis.call('HSET', jk, 'rate_limited_since', string.format('%.6f', now))
  return '0'
end
return string.format('%.6f', math.max(0, now - since))
"""

# KEYS: the queues to read; ARGV: first index, last index (LRANGE's, per queue).
# The job ids (Celery's root_id, memq's job id) of the messages in that range of each queue.
QUEUED_JOBS = """
local out = {}
for _, q in ipairs(KEYS) do
  for _, m in ipairs(redis.call('LRANGE', q, ARGV[1], ARGV[2])) do
    local id = string.match(m, '"root_id":%s*"([^"]+)"')
    if id then out[#out + 1] = id end
  end
end
return out
"""

# KEYS: the lease; ARGV: the holder's token. Delete the lease only if it is still the holder's.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

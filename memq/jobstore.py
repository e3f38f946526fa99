"""Job records in Redis: the stored request (claim check), per-stage outputs, status and result.

Keys (all expire after `jobs.ttl_s`):

- ``memq:job:{id}``               hash: status, stage, error, error_type, created_at, updated_at, results
- ``memq:job:{id}:request``       the `AddJob` as JSON; tasks carry only the job id
- ``memq:job:{id}:stage:{name}``  a stage's output as JSON, so a retried task reuses it
- ``memq:scope:{key}:seq``         the last sequence number given to a job of the scope
- ``memq:scope:{key}:applied``     every job of the scope up to this number has finished
- ``memq:scope:{key}:done``        finished sequence numbers above ``applied`` (out of order)

Scope keys never expire (three small keys per scope): an expired counter would reorder or stall a scope.

Enqueueing is one Lua script (one round trip, atomic per batch): for each job it stores the request
with ``SET NX``; only when that succeeds does it give the job the next sequence number of its scope,
write the status and push the task message. A job id derived from an idempotency key therefore
enqueues at most once while its record lives.

**One scope, one order.** A job may decide and write only when every earlier job of its scope has
finished (``applied == seq - 1``); a job that finishes (succeeded, partial or failed) marks its
number done and ``applied`` advances over every contiguous done number. The sequence number is also
the fencing token of the writes: a write of a job whose number is already applied is a stale
redelivery and is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from memq.errors import BrokerUnavailable, InvalidJob, JobNotFound, MemqError
from memq.models import AddJob, JobState, JobStatus, MemoryResult, utcnow

M = TypeVar("M", bound=BaseModel)
_Encodable = bytes | bytearray | memoryview | str | int | float  # what redis-py accepts as a hash field

_ENQUEUE_LUA = """
local ttl = tonumber(ARGV[1])
local now = ARGV[2]
local replay = ARGV[3] == '1'
local out = {}
local n = (#ARGV - 3) / 5
for i = 0, n - 1 do
  local base = 4 + i * 5
  local id, req, queue, msg, scope = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local hk = 'memq:job:' .. id
  local fresh
  if replay then
    fresh = redis.call('SET', hk .. ':request', req, 'EX', ttl)
  else
    fresh = redis.call('SET', hk .. ':request', req, 'NX', 'EX', ttl)
  end
  if fresh then
    local seq = redis.call('INCR', 'memq:scope:' .. scope .. ':seq')
    redis.call('DEL', hk .. ':written')
    redis.call('HDEL', hk, 'error', 'error_type', 'results', 'counts', 'relations', 'stage')
    redis.call('HSET', hk, 'status', 'queued', 'created_at', now, 'updated_at', now, 'seq', seq, 'scope', scope)
    redis.call('EXPIRE', hk, ttl)
    redis.call('LPUSH', queue, msg)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

_DONE_LUA = """
local applied_key, done_key = KEYS[1], KEYS[2]
local applied = tonumber(redis.call('GET', applied_key) or '0')
if tonumber(ARGV[1]) <= applied then
  return applied
end
redis.call('SADD', done_key, ARGV[1])
while redis.call('SREM', done_key, tostring(applied + 1)) == 1 do
  applied = applied + 1
end
redis.call('SET', applied_key, applied)
return applied
"""


@dataclass(frozen=True)
class Envelope:
    """A job ready to enqueue: its record and the broker message that starts it.

    Attributes:
        job: the validated job (stored as the claim check).
        queue: the Redis list the message goes to (the Celery queue name).
        message: the broker message, already serialized (bytes).
    """

    job: AddJob
    queue: str
    message: bytes


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(job_id: str) -> str:
    return f"memq:job:{job_id}"


class JobStore:
    """Reads and writes job records in Redis.

    Args:
        client: a `redis.Redis` client (``decode_responses=False``).
        ttl_s: lifetime of every record, in seconds.
        unavailable: the error class raised when Redis refuses or times out
            (`BrokerUnavailable` in the producer, `StoreUnavailable` in workers).
    """

    def __init__(self, client: redis.Redis, *, ttl_s: int, unavailable: type[MemqError] = BrokerUnavailable) -> None:
        self._r = client
        self._ttl_s = ttl_s
        self._unavailable = unavailable
        self._enqueue = client.register_script(_ENQUEUE_LUA)
        self._done = client.register_script(_DONE_LUA)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int, socket_timeout_s: float = 5.0,
                 unavailable: type[MemqError] = BrokerUnavailable) -> JobStore:
        """Connect lazily to the Redis at `url` (``redis://host:port/db``)."""
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
        return cls(client, ttl_s=ttl_s, unavailable=unavailable)

    @property
    def client(self) -> redis.Redis:
        """The underlying Redis client."""
        return self._r

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(f"Redis is unreachable: {exc}") from exc

    def enqueue(self, envelopes: Sequence[Envelope], *, replay: bool = False) -> list[bool]:
        """Record and enqueue jobs in one atomic round trip, each with the next number of its scope.

        Args:
            envelopes: jobs with their broker messages; may be empty.
            replay: enqueue even if a job with that id exists (dead-letter replay): its record is reset
                to ``queued`` and it gets a new place at the end of its scope's order.

        Returns:
            One flag per envelope: True if enqueued now, False if a job with that id already existed.

        Raises:
            BrokerUnavailable (or the class given at construction): Redis is down; nothing was enqueued.
        """
        if not envelopes:
            return []
        args: list[str | bytes | int] = [self._ttl_s, utcnow().isoformat(), "1" if replay else "0"]
        for env in envelopes:
            args += [env.job.job_id, env.job.model_dump_json(), env.queue, env.message, env.job.scope.key()]
        with self._mapped():
            flags = self._enqueue(keys=[], args=args)
        return [bool(f) for f in flags]

    def load_job(self, job_id: str) -> AddJob:
        """Read a job's stored request.

        Raises:
            InvalidJob: no request is stored under the id, or it does not validate.
        """
        with self._mapped():
            raw = self._r.get(_key(job_id) + ":request")
        if raw is None:
            raise InvalidJob(f"job {job_id} has no stored request (expired or never enqueued)", job_id=job_id)
        try:
            return AddJob.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidJob(f"job {job_id} does not validate: {exc.error_count()} errors", job_id=job_id) from exc

    def sequence(self, job_id: str) -> tuple[str, int]:
        """The job's scope key and sequence number in that scope.

        Raises:
            InvalidJob: the job record has no sequence (expired, or enqueued by an older memq).
        """
        with self._mapped():
            scope, seq = self._r.hmget(_key(job_id), ["scope", "seq"])
        if scope is None or seq is None:
            raise InvalidJob(f"job {job_id} has no scope sequence number", job_id=job_id)
        return _text(scope), int(seq)

    def applied(self, scope_key: str) -> int:
        """Highest sequence number of the scope below which every job has finished (0: none)."""
        with self._mapped():
            value = self._r.get(f"memq:scope:{scope_key}:applied")
        return int(value) if value is not None else 0

    def mark_done(self, scope_key: str, seq: int) -> int:
        """Mark a job of the scope finished (idempotent) and advance ``applied``; returns the new value."""
        with self._mapped():
            return int(self._done(keys=[f"memq:scope:{scope_key}:applied", f"memq:scope:{scope_key}:done"],
                                  args=[seq]))

    def save_stage(self, job_id: str, stage: str, output: BaseModel) -> None:
        """Keep a stage's output with the job (so a retry reuses it)."""
        with self._mapped():
            self._r.set(f"{_key(job_id)}:stage:{stage}", output.model_dump_json(), ex=self._ttl_s)

    def load_stage(self, job_id: str, stage: str, model: type[M]) -> M | None:
        """A stage's stored output, or None if the stage has not finished for this job."""
        with self._mapped():
            raw = self._r.get(f"{_key(job_id)}:stage:{stage}")
        return None if raw is None else model.model_validate_json(raw)

    def mark_written(self, job_id: str, write: str, *, expected: int) -> int:
        """Record that one of a job's parallel writes landed (idempotent).

        Args:
            job_id: the job.
            write: the write's name (``"write_vectors"``).
            expected: how many writes the job has (the count is capped there).

        Returns:
            How many distinct writes have landed after this call; when it equals `expected` the caller
            sends finalize (a redelivered last write sees it again: finalize is idempotent).
        """
        key = f"{_key(job_id)}:written"
        with self._mapped():
            pipe = self._r.pipeline(transaction=True)
            pipe.sadd(key, write)
            pipe.expire(key, self._ttl_s)
            pipe.scard(key)
            _, _, count = pipe.execute()
        return min(int(count), expected)

    def written(self, job_id: str) -> set[str]:
        """Names of the job's writes that have landed."""
        with self._mapped():
            return {_text(m) for m in self._r.smembers(f"{_key(job_id)}:written")}

    def set_state(self, job_id: str, state: JobState, *, stage: str | None = None,
                  error: BaseException | None = None) -> None:
        """Update a job's status (and its current stage or error)."""
        fields: dict[_Encodable, _Encodable] = {"status": state.value, "updated_at": utcnow().isoformat()}
        if stage is not None:
            fields["stage"] = stage
        if error is not None:
            fields["error"] = str(error) or type(error).__name__
            fields["error_type"] = type(error).__name__
        with self._mapped():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_key(job_id), mapping=fields)
            pipe.expire(_key(job_id), self._ttl_s)
            pipe.execute()

    def set_results(self, job_id: str, state: JobState, results: Sequence[MemoryResult],
                    counts: dict[str, int], *, relations: Sequence[Mapping[str, str]] = ()) -> None:
        """Record a finished (or partial) job's events, relations, counts per event and state in one write."""
        payload = json.dumps([r.model_dump(mode="json") for r in results])
        with self._mapped():
            pipe = self._r.pipeline(transaction=True)
            pipe.hset(_key(job_id), mapping={"status": state.value, "updated_at": utcnow().isoformat(),
                                              "results": payload, "counts": json.dumps(counts),
                                              "relations": json.dumps(list(relations)),
                                              "stage": "done"})
            if state is JobState.SUCCEEDED:
                pipe.hdel(_key(job_id), "error", "error_type")
            pipe.expire(_key(job_id), self._ttl_s)
            pipe.execute()

    def status(self, job_id: str) -> JobStatus:
        """A job's current record.

        Raises:
            JobNotFound: no record (never enqueued, or expired).
        """
        with self._mapped():
            raw = self._r.hgetall(_key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return _parse_status(job_id, raw)

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """Records of many jobs in one round trip; None where a job has no record."""
        with self._mapped():
            pipe = self._r.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(_key(job_id))
            raws = pipe.execute()
        return [_parse_status(job_id, raw) if raw else None for job_id, raw in zip(job_ids, raws)]


def _parse_status(job_id: str, raw: Mapping[Any, Any]) -> JobStatus:
    h = {_text(k): _text(v) for k, v in raw.items()}
    return JobStatus.model_validate({
        "job_id": job_id,
        "status": h["status"],
        "stage": h.get("stage"),
        "error": h.get("error"),
        "error_type": h.get("error_type"),
        "created_at": h.get("created_at"),
        "updated_at": h.get("updated_at"),
        "results": json.loads(h.get("results", "[]")),
        "counts": json.loads(h.get("counts", "{}")),
        "relations": json.loads(h.get("relations", "[]")),
    })

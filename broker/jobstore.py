"""Job records in Redis, and every change of a job's state as one atomic script that also queues what
runs next.

Keys (``{id}`` a job id, ``{scope}`` a `Scope.key`):

- ``memq:job:{id}``               hash: status, stage, error, error_type, waiting, created_at, updated_at,
                                  seq, scope, ids (the scope ids as JSON), idem, results, counts, relations,
                                  rate_limited_since (Redis time the current stage was first rate-limited)
- ``memq:job:{id}:request``       the `AddJob` as JSON (claim check: tasks carry only the job id)
- ``memq:job:{id}:stage:{name}``  a stage's output as JSON, written once (``SET NX``): every delivery
                                  of a stage, duplicates included, goes on with the first output
- ``memq:job:{id}:steps``         hash of the transitions already made (each queues its successor once)
- ``memq:job:{id}:written``       the parallel store writes that have landed
- ``memq:idem:{sha256}``          idempotency key -> job id; the hash covers the scope key and the
                                  caller's key, so keys of two scopes never meet
- ``memq:jobs:live``              sorted set of unfinished job ids by enqueue time (epoch seconds)
- ``memq:jobs:touched``           sorted set of unfinished job ids by last change (Redis time, epoch s);
                                  with the job's ``next`` field, how `broker.lost` finds a lost message
- ``memq:scope:{scope}:seq``      the last sequence number given to a job of the scope
- ``memq:scope:{scope}:applied``  every job of the scope up to this number has finished
- ``memq:scope:{scope}:done``     finished numbers above ``applied`` (out of order)
- ``memq:scope:{scope}:order``    sequence number -> job id, for unfinished jobs (who holds the scope)
- ``memq:scope:{scope}:waiting``  sequence number -> the decide message to push when its turn comes

**Nothing of a live job expires.** Its records get the TTL `ttl_s` only when it finishes (succeeded or
failed), so a job that waits in a queue longer than the TTL still runs, and its sequence number is
there to advance its scope. Scope keys never expire (a few small keys per scope).

**Atomic transitions.** Each method that changes a job runs one Lua script that checks the job is not
finished, records the change and ``LPUSH`` es the messages of the next tasks (built by
`broker.messages.TaskMessages`), so no step is recorded without its successor queued, and a step that
was already made (a redelivery, a duplicate) queues nothing again. A finished job stays finished: every
script returns ``"finished"`` for it and changes nothing. All scripts may run twice safely (a reply lost
with the connection), which is what lets workers retry them through a Redis restart.

**One scope, one order.** A job may decide and write only when every earlier job of its scope has
finished (``applied == seq - 1``). A job that ends (succeeded, failed, or partial: its memories are
published) marks its number done; ``applied`` advances over contiguous done numbers, and the decide
of the job whose turn has come is pushed at once (no polling needed; waiting decides also have a
slow backstop). The sequence number is also the fencing token of the writes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, ValidationError

from broker import scripts
from broker.lost import NextTask
from broker.messages import Next, TaskMessages
from broker.outage import ride_out
from memq.errors import InvalidJob, JobNotFound, describe
from memq.models import AddJob, JobState, JobStatus, MemoryResult, Scope, utcnow

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

LIVE_KEY = "memq:jobs:live"

def idempotency_slot(scope: Scope, key: str) -> str:
    """The Redis key of an idempotency key inside its scope (``memq:idem:<sha256>``)."""
    digest = hashlib.sha256(f"{scope.key()}\n{key}".encode()).hexdigest()
    return f"memq:idem:{digest}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(job_id: str) -> str:
    return f"memq:job:{job_id}"


@dataclass(frozen=True)
class JobMeta:
    """What the scripts keep about a job besides its request.

    Attributes:
        job_id: the job.
        status: its state.
        scope_key: its scope's `Scope.key`.
        seq: its sequence number in the scope.
        applied: the scope's ``applied`` (every job up to it has finished).
        deferrals: how often its decide has waited for its turn.
    """

    job_id: str
    status: JobState
    scope_key: str
    seq: int
    applied: int
    deferrals: int

    @property
    def finished(self) -> bool:
        """Succeeded or failed: nothing may change it any more."""
        return self.status in (JobState.SUCCEEDED, JobState.FAILED)

    @property
    def stale(self) -> bool:
        """Its scope has already applied it: a late delivery must not write again."""
        return self.applied >= self.seq

    @property
    def turn(self) -> bool:
        """Every earlier job of its scope has finished: it may decide and write."""
        return self.applied == self.seq - 1


class JobStore:
    """Reads and changes job records in Redis.

    Args:
        client: a `redis.Redis` client (``decode_responses=False``).
        ttl_s: lifetime of a finished job's records, in seconds.
        outage_s: how long a call keeps retrying while Redis is unreachable (seconds; 0: fail at
            once, as the producer does; workers ride out a Redis restart).
        messages: the task-message builder (its routes decide the queues).
    """

    def __init__(self, client: redis.Redis, *, ttl_s: int, outage_s: float = 0.0,
                 messages: TaskMessages | None = None) -> None:
        self._r = client
        self._ttl_s = ttl_s
        self._outage_s = outage_s
        self._messages = messages or TaskMessages()
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._step = client.register_script(scripts.STEP)
        self._join = client.register_script(scripts.JOIN)
        self._defer = client.register_script(scripts.DEFER)
        self._retry = client.register_script(scripts.RETRY)
        self._finish = client.register_script(scripts.FINISH)
        self._release = client.register_script(scripts.RELEASE)
        self._rescue = client.register_script(scripts.RESCUE)
        self._rate_limited = client.register_script(scripts.RATE_LIMITED)

    @classmethod
    def from_url(cls, url: str, *, ttl_s: int, socket_timeout_s: float = 5.0, outage_s: float = 0.0) -> JobStore:
        """Connect lazily to the Redis at `url` (``redis://host:port/db``)."""
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
        return cls(client, ttl_s=ttl_s, outage_s=outage_s)

    @property
    def client(self) -> redis.Redis:
        """The underlying Redis client."""
        return self._r

    @property
    def messages(self) -> TaskMessages:
        """The task-message builder (for callers that push messages through these scripts)."""
        return self._messages

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one Redis call, retried while Redis is unreachable for up to `outage_s` (`ride_out`).

        Raises:
            BrokerUnavailable: Redis stayed unreachable (nothing was changed by this call).
        """
        return ride_out(fn, self._outage_s)

    # --- enqueue ------------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[AddJob], *, replay: bool = False) -> list[tuple[str, bool]]:
        """Record and enqueue jobs in one atomic round trip, each with the next number of its scope.

        Args:
            jobs: validated jobs (their `job_id` is a fresh random id); may be empty.
            replay: run existing jobs again (dead-letter replay, ``memq jobs retry``): each keeps its
                id and its stage outputs, gives up its earlier place in its scope (which moves on)
                and gets a new place at the end.

        Returns:
            ``(job_id, fresh)`` per job: the id to follow and whether it was enqueued now; a job whose
            idempotency key its scope has seen returns the earlier job's id and ``fresh=False``.

        Raises:
            BrokerUnavailable: Redis is unreachable or too slow. Nothing was enqueued if Redis is
                down; if it was only slow the script may still have run (then a retry with the same
                idempotency key returns that job instead of enqueuing it twice).
        """
        if not jobs:
            return []
        now = utcnow()
        args: list[str | bytes | float] = [now.isoformat(), now.timestamp(), "1" if replay else "0"]
        for job in jobs:
            queue, message = self._messages.start(job.job_id)
            idem = idempotency_slot(job.scope, job.idempotency_key) if job.idempotency_key else ""
            ids = json.dumps([job.scope.user_id, job.scope.agent_id, job.scope.run_id])
            args += [job.job_id, job.model_dump_json(), queue, message, job.scope.key(), ids, idem]
        flat = self._call(lambda: self._enqueue(keys=[], args=args))
        return [(_text(flat[i]), bool(int(flat[i + 1]))) for i in range(0, len(flat), 2)]

    # --- reads --------------------------------------------------------------------------------

    def load_job(self, job_id: str) -> AddJob:
        """Read a job's stored request.

        Raises:
            InvalidJob: no request is stored under the id, or it does not validate.
            BrokerUnavailable: Redis is unreachable.
        """
        raw = self._call(lambda: self._r.get(_key(job_id) + ":request"))
        if raw is None:
            raise InvalidJob(f"job {job_id} has no stored request (expired or never enqueued)", job_id=job_id)
        try:
            return AddJob.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidJob(f"job {job_id} does not validate: {exc.error_count()} errors", job_id=job_id) from None

    def meta(self, job_id: str) -> JobMeta:
        """The job's state, scope and place in its scope's order.

        Raises:
            InvalidJob: the job has no record or no sequence number (never enqueued by this memq).
            BrokerUnavailable: Redis is unreachable.
        """
        def read() -> tuple[Any, ...]:
            status, scope, seq, deferrals = self._r.hmget(_key(job_id), ["status", "scope", "seq", "deferrals"])
            applied = self._r.get(f"memq:scope:{_text(scope)}:applied") if scope is not None else None
            return status, scope, seq, deferrals, applied

        status, scope, seq, deferrals, applied = self._call(read)
        if status is None or scope is None or seq is None:
            raise InvalidJob(f"job {job_id} has no record with a scope sequence number", job_id=job_id)
        return JobMeta(job_id=job_id, status=JobState(_text(status)), scope_key=_text(scope), seq=int(seq),
                       applied=int(applied or 0), deferrals=int(deferrals or 0))

    def load_stage(self, job_id: str, stage: str, model: type[M]) -> M | None:
        """A stage's stored output, or None if the stage has not finished for this job.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        raw = self._call(lambda: self._r.get(f"{_key(job_id)}:stage:{stage}"))
        return None if raw is None else model.model_validate_json(raw)

    def written(self, job_id: str) -> set[str]:
        """Names of the job's store writes that have landed."""
        return {_text(m) for m in self._call(lambda: self._r.smembers(f"{_key(job_id)}:written"))}

    def status(self, job_id: str, scope: Scope | None = None) -> JobStatus:
        """A job's current record, if the caller's scope covers the job's.

        Args:
            job_id: the job.
            scope: the caller's scope (`Scope.covers`); None only for operators' tools.

        Raises:
            JobNotFound: no record, or the job belongs to a scope the caller's does not cover (the
                same error: a caller cannot tell another scope's job from no job).
            BrokerUnavailable: Redis is unreachable.
        """
        status = self.statuses([job_id], scope)[0]
        if status is None:
            raise JobNotFound(job_id)
        return status

    def statuses(self, job_ids: Sequence[str], scope: Scope | None = None) -> list[JobStatus | None]:
        """Records of many jobs in one round trip; None where a job has no record or is out of `scope`."""
        return self.statuses_in([(job_id, scope) for job_id in job_ids])

    def statuses_in(self, jobs: Sequence[tuple[str, Scope | None]]) -> list[JobStatus | None]:
        """Records of many ``(job_id, caller's scope)`` in one round trip; None where a job has no
        record or its scope is not covered by the caller's (None: operators, no check)."""
        job_ids = [job_id for job_id, _ in jobs]

        def read() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hgetall(_key(job_id))
            return list(pipe.execute())

        out: list[JobStatus | None] = []
        for (job_id, scope), raw in zip(jobs, self._call(read)):
            h = {_text(k): _text(v) for k, v in raw.items()}
            if not h.get("status") or (scope is not None and not _covered(scope, h)):
                out.append(None)
            else:
                out.append(_parse_status(job_id, h))
        return out

    def states(self, job_ids: Sequence[str]) -> list[str | None]:
        """The ``status`` field of many jobs in one round trip (None where a job has no record): what
        a waiting client polls, before it reads (and scope-checks) the whole record of a finished job.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        def read() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(_key(job_id), "status")
            return list(pipe.execute())

        return [None if raw is None else _text(raw) for raw in self._call(read)]

    def live(self, *, limit: int = 1000) -> list[tuple[str, float]]:
        """Unfinished jobs, oldest first: ``(job_id, enqueued_at epoch seconds)``."""
        rows: list[Any] = self._call(lambda: self._r.zrange(LIVE_KEY, 0, limit - 1, withscores=True))
        return [(_text(job_id), float(score)) for job_id, score in rows]

    def live_scopes(self, scope: Scope, *, batch: int = 1000) -> list[Scope]:
        """The exact scopes of unfinished jobs that `scope` covers (an edit spanning `scope` must also
        follow the jobs already accepted there, even in a scope that has no memory yet).

        Reads the whole live set at once (ids only; a job that leaves it meanwhile has finished), then
        each job's scope ids in pipelined batches of `batch`.

        Raises:
            BrokerUnavailable: Redis is unreachable.
        """
        ids: list[Any] = self._call(lambda: self._r.zrange(LIVE_KEY, 0, -1))
        found: dict[tuple[str | None, ...], None] = {}
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]

            def read(chunk: list[Any] = chunk) -> list[Any]:
                pipe = self._r.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hget(_key(_text(job_id)), "ids")
                return pipe.execute()

            for raw in self._call(read):
                if raw is None:
                    continue
                u, a, r = json.loads(_text(raw))
                if scope.covers(u, a, r):
                    found.setdefault((u, a, r))
        return [Scope(user_id=u, agent_id=a, run_id=r) for u, a, r in found]

    # --- leases -------------------------------------------------------------------------------

    def lease(self, job_id: str, stage: str, *, ttl_s: float) -> str | None:
        """Take the right to compute a stage of the job (one delivery at a time asks the model).

        Args:
            job_id: the job.
            stage: the stage (``"extract"``).
            ttl_s: seconds after which the lease lapses by itself (a holder that died).

        Returns:
            A token to give back to `release`, or None when another delivery holds the lease.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        token = uuid.uuid4().hex
        taken = self._call(lambda: self._r.set(f"{_key(job_id)}:lease:{stage}", token, nx=True,
                                               px=max(1, int(ttl_s * 1000))))
        return token if taken else None

    def release(self, job_id: str, stage: str, token: str) -> None:
        """Give a lease back (only if it is still this token's)."""
        self._call(lambda: self._release(keys=[f"{_key(job_id)}:lease:{stage}"], args=[token]))

    def rate_limited_for(self, job_id: str) -> float:
        """Seconds the job's current stage has been rate-limited: since its first rate-limit (Redis time),
        which the first call for a stage records (answering 0). A finished stage (`step`) clears it.

        Returns:
            Seconds (>= 0); 0 for a job without a record or one that has finished.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        return float(_text(self._call(lambda: self._rate_limited(keys=[], args=[job_id]))))

    # --- transitions --------------------------------------------------------------------------

    def _pairs(self, job_id: str, steps: Sequence[Next], parent_id: str | None) -> list[str | bytes]:
        out: list[str | bytes] = []
        for step in steps:
            out += [self._messages.queue(step), self._messages.build(job_id, step, parent_id=parent_id)]
        return out

    def step(self, job_id: str, *, stage: str, output: BaseModel | None, marker: str,
             then: Sequence[Next], parent_id: str | None = None) -> str:
        """Record a finished stage and queue what runs next, atomically and once.

        Args:
            job_id: the job.
            stage: the stage label shown in the job's status (``"extract"``).
            output: the stage's output, stored once (a duplicate's output is dropped), or None.
            marker: the transition's name; when it was made before, nothing is queued again.
            then: the tasks to queue.
            parent_id: the Celery id of the current task.

        Returns:
            ``"ok"``, ``"done-before"`` (nothing queued), ``"finished"`` (the job had ended; nothing
            changed) or ``"missing"`` (no record).

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        out_name = stage if output is not None else ""
        out_json = output.model_dump_json() if output is not None else ""
        args = [job_id, utcnow().isoformat(), stage, out_name, out_json, marker, len(then),
                *self._pairs(job_id, then, parent_id)]
        return _text(self._call(lambda: self._step(keys=[], args=args)))

    def join(self, job_id: str, *, write: str, output: BaseModel, expected: int, finalize: Next,
             parent_id: str | None = None) -> str:
        """Record that one of the job's parallel writes landed; the last one queues `finalize` (once).

        Returns:
            ``"joined"`` (finalize queued now), ``"ok"``, ``"finished"`` or ``"missing"``.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        queue, message = self._messages.queue(finalize), self._messages.build(job_id, finalize, parent_id=parent_id)
        args: list[str | bytes | int] = [job_id, utcnow().isoformat(), write, output.model_dump_json(), expected,
                                         queue, message]
        return _text(self._call(lambda: self._join(keys=[], args=args)))

    def defer(self, job_id: str, *, decide: Next, backstop_s: float, parent_id: str | None = None) -> str:
        """Park the job's decide until its scope's turn comes (an earlier job has not finished).

        The decide is pushed again by the script that finishes the job before it; a backstop copy
        after `backstop_s` seconds covers a lost wake-up. If the turn has come meanwhile, the decide
        is queued at once.

        Returns:
            ``"deferred"``, ``"now"`` (queued at once), ``"stale"`` (already applied), ``"finished"``
            or ``"missing"``.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        wake = self._messages.build(job_id, decide, parent_id=parent_id)
        backstop = Next(decide.task, countdown_s=backstop_s, retries=decide.retries)
        args: list[str | bytes] = [
                job_id, utcnow().isoformat(), self._messages.queue(decide), wake, self._messages.queue(backstop),
                self._messages.build(job_id, backstop, parent_id=parent_id),
                "waiting for %d earlier job(s) of its scope; next to finish: job %s"]
        return _text(self._call(lambda: self._defer(keys=[], args=args)))

    def retry(self, job_id: str, *, step: Next, stage: str = "", error: BaseException | None = None,
              status: JobState | None = None, parent_id: str | None = None) -> str:
        """Queue `step` again (a retry or a requeue) and note the error, unless the job has finished.

        Returns:
            ``"ok"``, ``"finished"`` or ``"missing"``.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        args = [job_id, utcnow().isoformat(), stage, describe(error) if error else "",
                type(error).__name__ if error else "", status.value if status else "", self._messages.queue(step),
                self._messages.build(job_id, step, parent_id=parent_id)]
        return _text(self._call(lambda: self._retry(keys=[], args=args)))

    def finish(self, job_id: str, state: JobState, *, results: Sequence[MemoryResult] | None = None,
               counts: Mapping[str, int] | None = None, relations: Sequence[Mapping[str, str | bool]] = (),
               error: BaseException | None = None, stage: str = "done", then: Next | None = None,
               parent_id: str | None = None, images: Mapping[str, int] | None = None,
               warnings: Sequence[str] = ()) -> str:
        """End the job (succeeded or failed), or publish a partial one; its scope moves on.

        Args:
            job_id: the job.
            state: ``succeeded`` or ``failed`` (terminal: its records get the TTL), or ``partial``
                (its memories are published while a store write is retried).
            results, counts, relations: the job's events (Mem0's shape), when it has them.
            error: why it failed or is partial.
            stage: the stage label.
            then: a task to queue as well (the retried write of a partial job).
            parent_id: the Celery id of the current task.
            images: how the job's images were described (kept with its results).
            warnings: what the job could not use (kept with its results).

        Returns:
            ``"ok"``, ``"finished"`` (it had already ended: the first end wins) or ``"missing"``.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        terminal = state in (JobState.SUCCEEDED, JobState.FAILED)
        args: list[Any] = [
            job_id, utcnow().isoformat(), state.value,
            json.dumps([r.model_dump(mode="json") for r in results]) if results is not None else "",
            json.dumps(dict(counts or {})), json.dumps([dict(r) for r in relations]),
            describe(error) if error else "", type(error).__name__ if error else "", stage, self._ttl_s,
            "1" if terminal else "0", json.dumps(dict(images or {})), json.dumps(list(warnings))]
        if then is not None:
            args += [self._messages.queue(then), self._messages.build(job_id, then, parent_id=parent_id)]
        return _text(self._call(lambda: self._finish(keys=[], args=args)))

    def rescue(self, job_id: str, *, touched: bytes, steps: Sequence[NextTask], most: int) -> str:
        """Queue a lost job's next tasks again (`broker.lost`), unless it changed since it was found lost.

        Each message is new (its own task id and delivery tag), at the head of its queue (next out), with
        the attempt number of the lost one (a rescue is not an attempt) and what was left of its countdown.

        Args:
            job_id: the job.
            touched: its ``memq:jobs:touched`` score as read when it was found lost (raw bytes).
            steps: its lost messages (`LostJob.next`).
            most: rescues allowed per job without progress in between.

        Returns:
            ``"ok"`` (queued), ``"moved"`` (it changed: nothing queued), ``"exhausted"`` (rescued `most` times
            without progress, or no task recorded: nothing queued, the caller ends it), ``"finished"`` or
            ``"missing"``.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        now = utcnow()
        args: list[Any] = [job_id, now.isoformat(), touched, most, len(steps)]
        for task, retries, queue, eta in steps:
            left_s = 0.0
            if eta:
                try:
                    left_s = max(0.0, (datetime.fromisoformat(eta) - now).total_seconds())
                except (TypeError, ValueError):
                    left_s = 0.0
            args += [queue, TaskMessages({task: queue}).build(job_id, Next(task, countdown_s=left_s, retries=retries))]
        return _text(self._call(lambda: self._rescue(keys=[], args=args)))


def _covered(scope: Scope, h: Mapping[str, str]) -> bool:
    ids = json.loads(h.get("ids") or "null")
    return isinstance(ids, list) and len(ids) == 3 and scope.covers(*ids)


def _parse_status(job_id: str, h: Mapping[str, str]) -> JobStatus:
    return JobStatus.model_validate({
        "job_id": job_id,
        "status": h["status"],
        "stage": h.get("stage"),
        "error": h.get("error"),
        "error_type": h.get("error_type"),
        "waiting": h.get("waiting"),
        "created_at": h.get("created_at"),
        "updated_at": h.get("updated_at"),
        "results": json.loads(h.get("results", "[]")),
        "counts": json.loads(h.get("counts", "{}")),
        "relations": json.loads(h.get("relations", "[]")),
        "images": json.loads(h.get("images", "{}")),
        "warnings": json.loads(h.get("warnings", "[]")),
    })

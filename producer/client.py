"""The producer: validate add requests and enqueue them on Redis without waiting for any model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from broker.jobstore import JobStore
from memq.config import Settings, load_settings
from memq.errors import InvalidRequest, JobNotFound
from memq.models import AddJob, JobState, JobStatus, Receipt, Scope
from memq.scope import make_scope
from producer.order import round_robin
from producer.validate import build_job


class Producer:
    """Enqueues add jobs and reads their status.

    Each call is one round trip to Redis: a Lua script stores the request (claim check), the job
    record (``queued``) and pushes the start message, atomically, returning the earlier job instead
    for an idempotency key its scope has already used.

    Args:
        settings: memq settings; `load_settings()` when omitted.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self._jobs = JobStore.from_url(self.settings.redis.url, ttl_s=self.settings.jobs.ttl_s,
                                       socket_timeout_s=self.settings.redis.socket_timeout_s)

    def build(self, messages: object, **kwargs: Any) -> AddJob:
        """Validate one add request without enqueuing it (arguments as for `add`).

        Raises:
            InvalidRequest (and its subclasses): the request is bad.
        """
        return build_job(messages, limits=self.settings.limits, image_networks=self.settings.vision.networks,
                         **kwargs)

    def _enqueue(self, jobs: Sequence[AddJob]) -> list[Receipt]:
        """Enqueue `jobs` one scope in turn (`producer.order.round_robin`); receipts in `jobs`' order."""
        order = round_robin([job.scope.key() for job in jobs])
        receipts: dict[int, Receipt] = {}
        for i, (job_id, fresh) in zip(order, self._jobs.enqueue([jobs[i] for i in order]), strict=True):
            receipts[i] = Receipt(job_id=job_id, duplicate=not fresh, scope=jobs[i].scope)
        return [receipts[i] for i in range(len(jobs))]

    def add(self, messages: object, *, user_id: str | None = None, agent_id: str | None = None,
            run_id: str | None = None, metadata: Mapping[str, Any] | None = None, infer: bool = True,
            memory_type: str | None = None, prompt: str | None = None, timestamp: object = None,
            idempotency_key: str | None = None) -> Receipt:
        """Validate one add request and enqueue it; returns at once.

        Args: see `producer.validate.build_job` (same names as Mem0's ``Memory.add``).

        Returns:
            A `Receipt` with the `job_id` and the scope; ``duplicate=True`` if the scope already used
            the idempotency key (the earlier job's id is returned and nothing new is enqueued). Keys
            live inside a scope: the same key in two scopes makes two jobs.

        Raises:
            InvalidRequest (and its subclasses): the request is bad; nothing was enqueued.
            BrokerUnavailable: Redis is unreachable (nothing was enqueued) or answered too slowly (it
                may still have enqueued the job: retry with the same idempotency key, which then
                returns that job; without a key a retry may enqueue it twice).
        """
        job = self.build(messages, user_id=user_id, agent_id=agent_id, run_id=run_id, metadata=metadata,
                          infer=infer, memory_type=memory_type, prompt=prompt, timestamp=timestamp,
                          idempotency_key=idempotency_key)
        return self._enqueue([job])[0]

    def add_many(self, requests: Iterable[Mapping[str, Any]]) -> list[Receipt]:
        """Validate a batch of add requests, then enqueue all of them in one round trip.

        Jobs of one scope run in the order given. Jobs of different scopes are queued one scope in
        turn (`producer.order.round_robin`), so each scope's first job starts early instead of behind
        the other scopes' whole backlog.

        Args:
            requests: dicts with the keyword arguments of `add` plus ``messages``.

        Returns:
            One `Receipt` per request, in order.

        Raises:
            InvalidRequest: a request is bad (the message names its index); nothing was enqueued.
            BrokerUnavailable: as for `add`.
        """
        jobs: list[AddJob] = []
        for i, request in enumerate(requests):
            if not isinstance(request, Mapping) or "messages" not in request:
                raise InvalidRequest(f"requests[{i}] must be a dict with 'messages'", field=f"requests[{i}]")
            kwargs = dict(request)
            messages = kwargs.pop("messages")
            try:
                jobs.append(self.build(messages, **kwargs))
            except TypeError as exc:
                raise InvalidRequest(f"requests[{i}]: {exc}", field=f"requests[{i}]") from exc
            except InvalidRequest as exc:
                raise type(exc)(f"requests[{i}]: {exc}", field=exc.field) from exc
        return self._enqueue(jobs)

    def edit(self, jobs: Sequence[AddJob]) -> list[Receipt]:
        """Enqueue edit jobs (`producer.edits.build_edit_job`) in one round trip, each at the end of its
        scope's order.

        Returns:
            One `Receipt` per job, in order.

        Raises:
            BrokerUnavailable: Redis is unreachable (nothing was enqueued) or too slow.
        """
        return self._enqueue(jobs)

    def live_scopes(self, scope: Scope) -> list[Scope]:
        """The exact scopes of unfinished jobs that `scope` covers (`JobStore.live_scopes`)."""
        return self._jobs.live_scopes(scope)

    def _scope(self, user_id: object, agent_id: object, run_id: object) -> Scope:
        return make_scope(user_id=user_id, agent_id=agent_id, run_id=run_id,
                          max_chars=self.settings.limits.max_scope_id_chars)

    def status(self, job_id: str, *, user_id: str | None = None, agent_id: str | None = None,
               run_id: str | None = None) -> JobStatus:
        """A job's status: queued / running / succeeded / partial / failed, its error, and its events.

        Args:
            job_id: the job.
            user_id, agent_id, run_id: the caller's scope (at least one); it must cover the job's
                (every id given equals the job's).

        Raises:
            MissingScope, InvalidScope: no or a bad scope id.
            JobNotFound: no record, or the job belongs to another scope (the same error).
            BrokerUnavailable: Redis is unreachable.
        """
        return self._jobs.status(job_id, self._scope(user_id, agent_id, run_id))

    def statuses(self, receipts: Sequence[Receipt]) -> list[JobStatus | None]:
        """Statuses of many jobs, each checked against its receipt's scope (None for unknown ids)."""
        return self._jobs.statuses_in([(r.job_id, r.scope) for r in receipts])

    def wait(self, receipts: Sequence[Receipt], *, timeout_s: float = 3600.0, poll_s: float = 0.25,
             on_progress: Callable[[int, int], None] | None = None) -> list[JobStatus]:
        """Follow jobs until each is `succeeded` or `failed` (or the timeout passes).

        Args:
            receipts: what `add`/`add_many` returned (each job is read in its receipt's scope).
            timeout_s: give up after this many seconds and return the statuses as they are.
            poll_s: seconds between polls (each reads the status field of the unfinished jobs in one round
                trip; a job is read whole, and checked against its receipt's scope, first and once done).
            on_progress: called with (done, total) after every poll.

        Returns:
            One status per job, in order.

        Raises:
            JobNotFound: a job has no record in its receipt's scope.
            BrokerUnavailable: Redis is unreachable.
        """
        def full(chosen: Sequence[Receipt]) -> list[JobStatus]:
            statuses = self.statuses(chosen)
            missing = [r.job_id for r, s in zip(chosen, statuses) if s is None]
            if missing:
                raise JobNotFound(missing[0])
            return [s for s in statuses if s is not None]

        # the whole record (scope-checked) first and once a job is done; in between only its status field
        found = full(receipts)
        deadline = time.monotonic() + timeout_s
        while True:
            pending = [i for i, s in enumerate(found) if not s.done]
            if on_progress is not None:
                on_progress(len(found) - len(pending), len(receipts))
            if not pending:
                return found
            if time.monotonic() > deadline:
                for i, s in zip(pending, full([receipts[i] for i in pending])):
                    found[i] = s
                return found
            time.sleep(poll_s)
            states = self._jobs.states([receipts[i].job_id for i in pending])
            changed = [i for i, state in zip(pending, states) if state is None or state in _DONE]
            for i, s in zip(changed, full([receipts[i] for i in changed])):
                found[i] = s

    def wait_for(self, receipt: Receipt, condition: Callable[[JobStatus], bool], *, timeout_s: float = 60.0,
                 poll_s: float = 0.1) -> JobStatus:
        """Poll one job until `condition(status)` holds or `timeout_s` passes; returns the last status.

        Raises:
            JobNotFound: the job has no record in the receipt's scope.
            BrokerUnavailable: Redis is unreachable.
        """
        return _poll(lambda: self._jobs.status(receipt.job_id, receipt.scope), condition, timeout_s, poll_s)

    def close(self) -> None:
        """Release the Redis connection pool."""
        self._jobs.client.close()


T = TypeVar("T")
_DONE = {JobState.SUCCEEDED.value, JobState.FAILED.value}


def _poll(fetch: Callable[[], T], finished: Callable[[T], bool], timeout_s: float, poll_s: float) -> T:
    """Call `fetch` every `poll_s` seconds until `finished` holds or `timeout_s` passes; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if finished(value) or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


_default: Producer | None = None


def _producer() -> Producer:
    global _default
    if _default is None:
        _default = Producer()
    return _default


def add(messages: object, **kwargs: Any) -> Receipt:
    """`Producer.add` on a process-wide producer built from the environment's settings."""
    return _producer().add(messages, **kwargs)


def add_many(requests: Iterable[Mapping[str, Any]]) -> list[Receipt]:
    """`Producer.add_many` on the process-wide producer."""
    return _producer().add_many(requests)


def status(job_id: str, *, user_id: str | None = None, agent_id: str | None = None,
           run_id: str | None = None) -> JobStatus:
    """`Producer.status` on the process-wide producer."""
    return _producer().status(job_id, user_id=user_id, agent_id=agent_id, run_id=run_id)

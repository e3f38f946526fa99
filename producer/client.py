"""The producer: validate add requests and enqueue them on Redis without waiting for any model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from celery import Celery

from memq.config import Queues, Settings, load_settings
from memq.errors import InvalidRequest, JobNotFound
from memq.jobstore import Envelope, JobStore
from memq.models import AddJob, JobStatus, Receipt
from memq.messages import StartMessages
from producer.validate import build_job


class Producer:
    """Enqueues add jobs and reads their status.

    Each call is one round trip to Redis: a Lua script stores the request (claim check), the job
    record (``queued``) and pushes the start message, atomically, skipping jobs whose idempotency key
    was seen before.

    Args:
        settings: memq settings; `load_settings()` when omitted.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self._jobs = JobStore.from_url(self.settings.redis.url, ttl_s=self.settings.jobs.ttl_s,
                                       socket_timeout_s=self.settings.redis.socket_timeout_s)
        self._messages = StartMessages(Celery("memq-producer", set_as_current=False))

    def _build(self, messages: object, **kwargs: Any) -> AddJob:
        return build_job(messages, limits=self.settings.limits, **kwargs)

    def _enqueue(self, jobs: Sequence[AddJob]) -> list[Receipt]:
        envelopes = [Envelope(job, Queues.LIGHT, self._messages.build(job.job_id, Queues.LIGHT)) for job in jobs]
        fresh = self._jobs.enqueue(envelopes)
        return [Receipt(job_id=job.job_id, duplicate=not new) for job, new in zip(jobs, fresh)]

    def add(self, messages: object, *, user_id: str | None = None, agent_id: str | None = None,
            run_id: str | None = None, metadata: Mapping[str, Any] | None = None, infer: bool = True,
            memory_type: str | None = None, prompt: str | None = None, timestamp: object = None,
            idempotency_key: str | None = None) -> Receipt:
        """Validate one add request and enqueue it; returns at once.

        Args: see `producer.validate.build_job` (same names as Mem0's ``Memory.add``).

        Returns:
            A `Receipt` with the `job_id`; ``duplicate=True`` if the idempotency key was seen before
            (the earlier job's id is returned and nothing new is enqueued).

        Raises:
            InvalidRequest (and its subclasses): the request is bad; nothing was enqueued.
            BrokerUnavailable: Redis is unreachable; nothing was enqueued.
        """
        job = self._build(messages, user_id=user_id, agent_id=agent_id, run_id=run_id, metadata=metadata,
                          infer=infer, memory_type=memory_type, prompt=prompt, timestamp=timestamp,
                          idempotency_key=idempotency_key)
        return self._enqueue([job])[0]

    def add_many(self, requests: Iterable[Mapping[str, Any]]) -> list[Receipt]:
        """Validate a batch of add requests, then enqueue all of them in one round trip.

        Args:
            requests: dicts with the keyword arguments of `add` plus ``messages``.

        Returns:
            One `Receipt` per request, in order.

        Raises:
            InvalidRequest: a request is bad (the message names its index); nothing was enqueued.
            BrokerUnavailable: Redis is unreachable; nothing was enqueued.
        """
        jobs: list[AddJob] = []
        for i, request in enumerate(requests):
            if not isinstance(request, Mapping) or "messages" not in request:
                raise InvalidRequest(f"requests[{i}] must be a dict with 'messages'", field=f"requests[{i}]")
            kwargs = dict(request)
            messages = kwargs.pop("messages")
            try:
                jobs.append(self._build(messages, **kwargs))
            except TypeError as exc:
                raise InvalidRequest(f"requests[{i}]: {exc}", field=f"requests[{i}]") from exc
            except InvalidRequest as exc:
                raise type(exc)(f"requests[{i}]: {exc}", field=exc.field) from exc
        return self._enqueue(jobs)

    def status(self, job_id: str) -> JobStatus:
        """A job's status: queued / running / succeeded / partial / failed, its error, and its events.

        Raises:
            JobNotFound: no record for the id.
            BrokerUnavailable: Redis is unreachable.
        """
        return self._jobs.status(job_id)

    def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """Statuses of many jobs (None for unknown ids), in few round trips."""
        return self._jobs.statuses(job_ids)

    def wait(self, job_ids: Sequence[str], *, timeout_s: float = 3600.0, poll_s: float = 0.25,
             on_progress: Callable[[int, int], None] | None = None) -> list[JobStatus]:
        """Follow jobs until each is `succeeded` or `failed` (or the timeout passes).

        Args:
            job_ids: the jobs to follow.
            timeout_s: give up after this many seconds and return the statuses as they are.
            poll_s: seconds between polls (each poll is one round trip for all jobs).
            on_progress: called with (done, total) after every poll.

        Returns:
            One status per job, in order (an unknown id raises).

        Raises:
            JobNotFound: a job has no record.
            BrokerUnavailable: Redis is unreachable.
        """
        def fetch() -> list[JobStatus]:
            statuses = self._jobs.statuses(job_ids)
            missing = [j for j, s in zip(job_ids, statuses) if s is None]
            if missing:
                raise JobNotFound(missing[0])
            found = [s for s in statuses if s is not None]
            if on_progress is not None:
                on_progress(sum(s.done for s in found), len(job_ids))
            return found

        return _poll(fetch, lambda found: all(s.done for s in found), timeout_s, poll_s)

    def wait_for(self, job_id: str, condition: Callable[[JobStatus], bool], *, timeout_s: float = 60.0,
                 poll_s: float = 0.1) -> JobStatus:
        """Poll one job until `condition(status)` holds or `timeout_s` passes; returns the last status.

        Raises:
            JobNotFound: the job has no record.
            BrokerUnavailable: Redis is unreachable.
        """
        return _poll(lambda: self._jobs.status(job_id), condition, timeout_s, poll_s)

    def close(self) -> None:
        """Release the Redis connection pool."""
        self._jobs.client.close()


T = TypeVar("T")


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


def status(job_id: str) -> JobStatus:
    """`Producer.status` on the process-wide producer."""
    return _producer().status(job_id)

"""memq's error classes, in one tree.

::

    MemqError
    ├── InvalidRequest (ValueError)   a bad add/search request, raised before anything is enqueued
    │   ├── MissingScope              no user_id / agent_id / run_id
    │   ├── InvalidScope              a scope id that is empty, too long, not a string or not valid text
    │   │   └── ScopeMismatch         a call's scope id differs from the one its client is bound to
    │   ├── EmptyMessages             no message, or only empty text
    │   ├── InvalidMessage            unknown role, non-text content, malformed message, invalid text
    │   ├── MessageTooLarge           a message's text, name, id or image URL over its limit
    │   ├── RequestTooLarge           an add's text or image URLs together over their limit
    │   ├── InvalidMetadata           metadata that is not a JSON object, too large or too deep
    │   ├── InvalidTimestamp          a timestamp of the wrong type or outside the years memq handles
    │   ├── InvalidOption             infer, memory_type, prompt or idempotency_key of a bad type or value
    │   ├── InvalidSearch             a search/get_all query, limit or threshold of a bad type or value
    │   │   └── InvalidTimeRange      a search's after/before: not a date, or after >= before
    │   ├── InvalidFilter             search/get_all filters: not a dict, a key memq owns, a bad value
    │   └── InvalidEdit               an update/delete/batch request: no change, a bad id, over 1,000 items
    ├── MemoryNotFound (ValueError)   no memory of that id in the caller's scope (Mem0 raises ValueError)
    ├── JobNotFound (KeyError)        no record for that job id
    ├── WaitTimeout (TimeoutError)    a call that waits for its job gave up before the job ended
    ├── InvalidSettings (ValueError)  a MEMQ_* variable with a bad value or an unknown name
    ├── BrokerUnavailable             Redis refused or timed out while enqueuing; nothing was enqueued
    └── PipelineError                 raised inside workers; the job records it
        ├── InvalidJob                the stored job fails validation; never retried
        ├── LLMOutputError            the model's reply does not fit the response model
        ├── StoreError                permanent store failure (vector size mismatch, constraint)
        ├── RateLimitBudgetExceeded   rate-limited longer than ``jobs.rate_limit_budget_s``: the job fails
        ├── ProviderQuotaExhausted    the provider's 429 says the account's quota (billing) is used up:
        │                             not a rate limit, the job fails at once
        └── TransientError            retried with backoff
            ├── LLMUnavailable        rate-limited, timed out, refused, 5xx
            │   └── ProviderThrottled the provider answered 429 (with or without Retry-After)
            ├── StoreUnavailable      Qdrant, Neo4j or SQL refused or timed out
            ├── RateLimited           no budget yet in the shared limiter, or the provider's 429: wait,
            │                         not a failure (never an attempt)
            └── StageBusy             another delivery of the stage is computing it: wait, not a failure
        JobFailed                     raised to Celery after a job's failure is recorded (no user data)

Third-party errors are translated where the client is called (`pipeline/llm.py`, `stores/*.py`) and
chained with ``raise ... from exc``. Retry by class, never by message text.
"""

from __future__ import annotations


class MemqError(Exception):
    """Base class of every error memq raises on purpose."""


class InvalidRequest(MemqError, ValueError):
    """A request memq refuses before enqueuing anything.

    Attributes:
        field: the request field at fault (``"messages[2].role"``, ``"user_id"``), when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MissingScope(InvalidRequest):
    """None of user_id, agent_id, run_id was given."""


class InvalidScope(InvalidRequest):
    """A scope id is empty, too long, not a string, or not valid text (control characters, lone surrogates)."""


class EmptyMessages(InvalidRequest):
    """No message, or no message with any text or image."""


class InvalidMessage(InvalidRequest):
    """A message has an unknown role, non-text content, an unknown shape, or a string that is not valid
    text (a lone surrogate cannot be encoded as UTF-8; U+0000 cannot be stored in a SQL text column)."""


class MessageTooLarge(InvalidRequest):
    """A message's text, name, id or an image URL is longer than its limit (characters)."""


class InvalidImage(InvalidMessage):
    """An image part is not an image memq can pass on: a ``data:`` URL whose MIME type is not an image
    type memq accepts (PNG, JPEG, GIF, WebP), whose payload is not valid base64, or whose bytes do not
    start with that type's magic bytes (a lying MIME type)."""


class ImageTooLarge(MessageTooLarge):
    """An image is over its byte limit: a ``data:`` URL's decoded size (producer), or a download's size
    (``MEMQ_VISION__FETCH``)."""


class UnsafeImageURL(InvalidMessage):
    """An image URL memq will not pass to a model or fetch: not http(s) or ``data:``, with credentials,
    or naming (or, when fetching, resolving to or redirecting to) a loopback, private, link-local,
    reserved or cloud-metadata address."""


class RequestTooLarge(InvalidRequest):
    """An add's text (messages, names, ids, prompt) or its image URLs add up to more than their limit."""


class InvalidMetadata(InvalidRequest):
    """Metadata is not a JSON object of JSON values (string keys, finite numbers, 64-bit integers, valid
    text), is too large, or is nested too deep."""


class InvalidTimestamp(InvalidRequest):
    """A timestamp is not a datetime, an ISO-8601 string or finite epoch seconds, or lies outside the
    years the pipeline can compute with (see `memq.checks.EARLIEST_TIMESTAMP`)."""


class InvalidOption(InvalidRequest):
    """An add option (infer, memory_type, prompt, idempotency_key) has the wrong type, is empty, too long,
    or is not valid text."""


class InvalidSearch(InvalidRequest):
    """A search or get_all argument is bad: the query (empty, too long, not valid text), `limit` (not an
    int in range) or `threshold` (not a real number in range)."""


class InvalidTimeRange(InvalidSearch):
    """A search's time range is bad: `after` or `before` is not a date or datetime (or an ISO-8601 string
    of one), lies outside the years memq handles, or `after` is not earlier than `before`."""


class InvalidFilter(InvalidRequest):
    """Search or get_all filters are not a dict of string keys to scalar values, or name a key memq owns."""


class ScopeMismatch(InvalidScope):
    """A call names a scope id that differs from the one its `memq.Memory` client is bound to (a client
    bound to a tenant can narrow its scope, never leave it)."""


class InvalidEdit(InvalidRequest):
    """An update, delete or batch request memq refuses: no text and no metadata, a memory id that is not
    a string, an item without ``memory_id``, or more items than a batch takes."""


class MemoryNotFound(MemqError, ValueError):
    """No memory with this id is visible in the caller's scope (unknown, deleted, or another scope's:
    the same error, so a caller cannot learn that another tenant's memory exists).

    Attributes:
        memory_id: the id asked for.
    """

    def __init__(self, memory_id: str) -> None:
        super().__init__(f"no memory {memory_id[:64]!r} in this scope")
        self.memory_id = memory_id


class WaitTimeout(MemqError, TimeoutError):
    """A call that waits for its jobs (``wait=True``) gave up after its timeout; the jobs go on.

    Attributes:
        job_ids: the jobs that had not ended (follow them with `memq.Memory.status`).
    """

    def __init__(self, message: str, *, job_ids: list[str]) -> None:
        super().__init__(message)
        self.job_ids = job_ids


class InvalidSettings(MemqError, ValueError):
    """Settings that do not load: a ``MEMQ_*`` variable with a bad value or a name memq does not know.

    Attributes:
        problems: one line per variable (``MEMQ_LLM__TIMEOUT_S: Input should be a valid number``).
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class JobNotFound(MemqError, KeyError):
    """No job record exists for the id (never enqueued, or expired)."""


class BrokerUnavailable(MemqError):
    """Redis (the broker and the job records) refused or timed out.

    In the producer nothing was enqueued if Redis is down; if Redis was only slow past the socket
    timeout, the enqueue script may still have run, so retry with the same idempotency key. In a
    worker it means Redis stayed unreachable longer than ``jobs.broker_outage_s``: the task's message
    is left unacknowledged and is delivered again.
    """


class PipelineError(MemqError):
    """Base of the errors raised while a job runs in a worker.

    Attributes:
        job_id: the job, when known.
    """

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class InvalidJob(PipelineError):
    """The stored job does not validate (or is missing); never retried."""


class LLMOutputError(PipelineError):
    """The model's reply does not fit the response model, even after one JSON repair.

    Attributes:
        reply: the raw reply text (user data: never log it above DEBUG).
    """

    def __init__(self, message: str, *, reply: str = "", job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id)
        self.reply = reply


class StoreNeedsMigration(MemqError):
    """The vector store's folder was written by an older memq (qdrant-client local mode); run
    ``memq migrate-store`` to copy it into the embedded Edge store. Nothing is read or changed until then."""


class StoreError(PipelineError):
    """A permanent store failure (vector size mismatch, constraint violation)."""


class TransientError(PipelineError):
    """A failure worth retrying with backoff."""


class LLMUnavailable(TransientError):
    """The model provider rate-limited, timed out, refused the connection or answered 5xx.

    Attributes:
        retry_after_s: the provider's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None, job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id)
        self.retry_after_s = retry_after_s


class ProviderThrottled(LLMUnavailable):
    """The provider answered 429 (too many requests). `pipeline.llm` and a worker's hosted embedder turn
    it into `RateLimited` (a wait, never an attempt, `broker.budget`); elsewhere (a rerank, a read
    helper's embedder) it is an `LLMUnavailable` like any other. A 429 saying the quota is used up is
    `ProviderQuotaExhausted` instead.

    Attributes:
        retry_after_s: the provider's ``Retry-After`` in seconds, or None when it sent none.
    """


class StoreUnavailable(TransientError):
    """Qdrant, Neo4j, the SQL database or (for the rate limiter) Redis refused or timed out."""


class StoreOwned(StoreUnavailable):
    """The embedded vector store's folder is owned by another process (the message names the folder and
    the owner). In embedded mode one process, the worker, owns it; others read through it."""


class NoStoreOwner(StoreUnavailable):
    """A process that does not own the embedded vector store asked its owner and none answered: no
    worker runs on that folder (start one, or let the command open the folder itself)."""


class EmbedderUnavailable(StoreUnavailable):
    """The offline embedder's child process (``MEMQ_EMBEDDER__PROCESSES``) died mid-pass or could not
    start; retried like a store outage, and the next pass starts a new child (`stores.embed_process`)."""


class NotNow(TransientError):
    """Not now, and not a failure: the task is re-queued after `retry_after_s` seconds without counting
    an attempt (`RateLimited`, `StageBusy`).

    Attributes:
        retry_after_s: how long to wait (seconds).
    """

    def __init__(self, message: str, *, retry_after_s: float, job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id)
        self.retry_after_s = retry_after_s


class RateLimited(NotNow):
    """The model has no room now: the shared rate limiter has no budget for it yet, or the provider
    answered 429 (then the error's cause is a `ProviderThrottled`, and ``retry_after_s`` is its
    ``Retry-After`` or the pause memq learned, `broker.adaptive`). The task is re-queued without
    counting an attempt; only ``jobs.rate_limit_budget_s`` ends a job that stays rate-limited
    (`RateLimitBudgetExceeded`). (A job waiting for its scope's turn is not rate limited: see
    `jobs.transitions.Deferred`.)"""


class StageBusy(NotNow):
    """Another delivery of the same stage of the job holds the lease on computing it (a duplicate after
    a restore). By the time it is re-queued, the other delivery has stored the stage's output (reused,
    no model call), or it died and its lease lapsed."""


class RateLimitBudgetExceeded(PipelineError):
    """A stage of the job stayed rate-limited (the shared limiter's waits and the provider's 429s) longer
    than ``jobs.rate_limit_budget_s`` since it was first rate-limited, without finishing: the job is ended
    as failed, with a dead letter kept for replay, so its scope moves on.

    Attributes:
        waited_s: seconds since the stage was first rate-limited.
        budget_s: the budget (``jobs.rate_limit_budget_s``).
    """

    def __init__(self, message: str, *, waited_s: float, budget_s: float, job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id)
        self.waited_s = waited_s
        self.budget_s = budget_s


class ProviderQuotaExhausted(PipelineError):
    """The provider answered 429 with OpenAI's error code ``insufficient_quota``: the account's credit or
    monthly quota is used up (billing), which no wait cures. Not retried: the job fails at once with a
    dead letter (``memq dlq replay`` runs it again once the account has credit).

    Attributes:
        code: the provider's error code (``"insufficient_quota"``).
    """

    def __init__(self, message: str, *, code: str, job_id: str | None = None) -> None:
        super().__init__(message, job_id=job_id)
        self.code = code


class MessageLost(PipelineError):
    """A job's next task message was lost and queued again ``jobs.rescue_max`` times without the job making
    progress in between (or no next task was recorded for it): the job is ended as failed, with a dead
    letter kept for replay, so its scope moves on instead of waiting for it forever."""


class ImageFetchError(PipelineError):
    """An image could not be downloaded (``MEMQ_VISION__FETCH``): a refused, timed-out or failed request,
    a non-image or lying content type, or a body over the size limit. The caption stage drops the image
    with a warning in the job's result (the text around it is kept)."""


class JobFailed(PipelineError):
    """Raised to Celery once a job's failure is recorded (status, dead letter, scope moved on), so
    Flower and the worker log show the task failed. Its message names the job, the stage and the
    error class only: never user data.

    Attributes:
        stage: the task that failed (``"memq.extract"``).
        error_type: the class name of the error that failed the job.
    """

    def __init__(self, message: str, *, job_id: str | None = None, stage: str = "", error_type: str = "") -> None:
        super().__init__(message, job_id=job_id)
        self.stage = stage
        self.error_type = error_type

    @classmethod
    def of(cls, job_id: str, stage: str, error_type: str) -> JobFailed:
        """``job <id> failed in <stage>: <error class>``."""
        return cls(f"job {job_id} failed in {stage}: {error_type}", job_id=job_id, stage=stage, error_type=error_type)


def describe(error: BaseException) -> str:
    """What job records, dead letters and logs above DEBUG may say about an error: memq's own message
    (which never holds user text), or only the class name for anything else (a third-party message
    may quote user data)."""
    if isinstance(error, MemqError):
        return str(error) or type(error).__name__
    return f"{type(error).__name__} (details in the worker log at DEBUG)"

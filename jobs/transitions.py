"""What can happen to an add job after one of its tasks runs: the values `jobs.add` returns and
`jobs.ledger.JobLedger.commit` records, each in one atomic step together with the next task's message.

- `Advance`: a stage finished; keep its output and queue the tasks that follow.
- `Deferred`: an earlier job of the scope has not finished; the decide waits for its turn (this is
  a scope's order, not rate limiting: it costs no attempt and no model budget).
- `Joined`: one of the parallel store writes landed; the last one queues finalize.
- `Retry`: run the task again later (a transient error, counted as an attempt; or a requeue after
  the shared rate limiter said "not yet", not counted).
- `Finished`: the job ended (succeeded or failed, with its dead letter), or is ``partial``: its
  memories are published while one store write is retried.
- `Skip`: nothing to do (a redelivery of a finished job, or a late duplicate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from broker.messages import Next
from memq.models import AddJob, JobState, MemoryResult
from stores.history import HistoryRecord


@dataclass(frozen=True)
class Advance:
    """A stage finished.

    Attributes:
        stage: its name (``"extract"``); also the name its output is stored under.
        output: the stage's output (stored once per job), or None.
        then: the tasks to queue next.
        record: the job, when its durable SQL record must be written now (the start).
    """

    stage: str
    output: BaseModel | None
    then: tuple[Next, ...]
    record: AddJob | None = None


@dataclass(frozen=True)
class Deferred:
    """The job's decide waits until every earlier job of its scope has finished.

    Attributes:
        decide: the decide task to queue when the turn comes.
        backstop_s: seconds until a backstop copy runs anyway (covers a lost wake-up).
    """

    decide: Next
    backstop_s: float


@dataclass(frozen=True)
class Joined:
    """One of the job's parallel store writes landed.

    Attributes:
        write: its name (``"write_vectors"``).
        output: its result (counts, duration).
        expected: how many writes the job has; the last to land queues `finalize`.
        finalize: the task that ends the job.
    """

    write: str
    output: BaseModel
    expected: int
    finalize: Next


@dataclass(frozen=True)
class Retry:
    """Run a task again later.

    Attributes:
        step: the task, its countdown (seconds) and attempt number.
        error: the error that made it retry (None for a rate-limit requeue).
        stage: the stage label to show.
        status: a new status for the job (``partial`` while a store write retries), or None.
    """

    step: Next
    error: BaseException | None = None
    stage: str = ""
    status: JobState | None = None


@dataclass(frozen=True)
class Finished:
    """The job ended (``succeeded`` or ``failed``) or is ``partial``.

    Attributes:
        state: succeeded, failed or partial.
        job: the request, when it could be read (for the SQL record and the dead letter).
        results, counts, relations: the job's events in Mem0's shape (None when it failed).
        history: history rows to write (idempotent ids).
        error: why it failed, or why it is partial.
        stage: the stage label (``"done"``, or the task that failed).
        attempts: attempts made by the failing task (kept in the dead letter).
        then: a task to queue as well (the retried write of a partial job).
        llm_calls, prompt_tokens: the job's model usage, for the outcome's log line.
        images: how the job's images were described (`pipeline.types.ImageCounts.as_dict`).
        warnings: what the job could not use (a dropped image), for its result.
    """

    state: JobState
    job: AddJob | None
    results: Sequence[MemoryResult] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    relations: Sequence[Mapping[str, str | bool]] = ()
    history: Sequence[HistoryRecord] = ()
    error: BaseException | None = None
    stage: str = "done"
    attempts: int = 0
    then: Next | None = None
    llm_calls: int = 0
    prompt_tokens: int = 0
    images: dict[str, int] = field(default_factory=dict)
    warnings: Sequence[str] = ()


@dataclass(frozen=True)
class Skip:
    """Nothing to do.

    Attributes:
        reason: why (for the debug log): ``"finished"``, ``"already applied"``, ``"written before"``.
    """

    reason: str


Transition = Advance | Deferred | Joined | Retry | Finished | Skip
"""What one task run does to its job."""

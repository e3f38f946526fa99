"""Lost task messages: unfinished jobs whose next task is in no queue and held by no worker.

kombu's Redis transport takes a message with ``BRPOP`` and only afterwards, from the worker, records
it as unacknowledged (``HSET unacked``; the visibility timeout brings back what is recorded there). A
worker killed between the two loses the message, and with it the job's next step: the job never
finishes and every later job of its scope waits for it. A blocking read from several queues cannot
also record the message in the same Redis command, so memq closes the gap after the fact:

- every change of a live job stamps ``memq:jobs:touched`` with the Redis server time and keeps the
  task names, attempt numbers and queues of the messages it queued (the job's ``next`` field;
  `broker.scripts.note`);
- a job is *lost* when it has been unchanged for ``quiet_s`` seconds and no message of it is in the
  queues it used or in kombu's ``unacked`` hash (the messages workers hold, countdowns included),
  and this is still so when looked at again ``confirm_s`` later (a live worker usually records a
  message it took within milliseconds; kombu 5.7 may also hold a read reply while the worker has no
  prefetch room, so a job can be rescued needlessly: one more delivery, which every stage absorbs,
  and a rescue followed by progress does not count toward the job's limit). A message held for longer than ``held_for_s`` (twice the visibility
  timeout, after which kombu should have brought a dead worker's message back) no longer counts: if
  kombu's restore is stuck, for instance on the ``unacked_mutex`` a worker killed inside it leaves for
  5 minutes, the job is rescued anyway and the late restore is one more duplicate delivery.

Reading a queue is done by a Lua script in slices of `chunk` messages, which returns only the job ids
(Celery's ``root_id`` header, which memq sets to the job id): the messages never leave Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from broker import scripts
from memq.config import Queues

UNACKED_KEY = "unacked"
"""kombu's hash of the messages workers hold (delivery tag -> ``[message, exchange, routing key]``): its
default name, which memq's ``celeryconfig`` keeps (it sets neither ``unacked_key`` nor ``global_keyprefix``)."""

UNACKED_INDEX_KEY = "unacked_index"
"""kombu's sorted set of held messages: delivery tag -> when it was taken (epoch seconds)."""

# KEYS: unacked hash, unacked index; ARGV: messages taken before this epoch no longer count as held
_UNACKED_JOBS = """
local out = {}
local kv = redis.call('HGETALL', KEYS[1])
for i = 1, #kv, 2 do
  local since = redis.call('ZSCORE', KEYS[2], kv[i])
  if not since or tonumber(since) >= tonumber(ARGV[1]) then
    local id = string.match(kv[i + 1], '"root_id":%s*"([^"]+)"')
    if id then out[#out + 1] = id end
  end
end
return out
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NextTask(NamedTuple):
    """A task message a job's last change queued, as `broker.scripts` notes it.

    Attributes:
        task: the task name (``"memq.decide"``).
        retries: its attempt number.
        queue: the queue it went to.
        eta: when it was due (ISO-8601 UTC, Celery's ``eta`` header), "" for at once.
    """

    task: str
    retries: int
    queue: str
    eta: str = ""


@dataclass(frozen=True)
class LostJob:
    """A job whose next task message is nowhere.

    Attributes:
        job_id: the job.
        touched: its ``memq:jobs:touched`` score as Redis returned it (`JobStore.rescue` pushes only if it
            is unchanged).
        next: the messages its last change queued (empty when unknown).
    """

    job_id: str
    touched: bytes
    next: tuple[NextTask, ...]


class LostJobs:
    """Finds lost jobs in the Redis of a memq deployment.

    Args:
        client: a `redis.Redis` client (``decode_responses=False``) on the broker's database.
        held_for_s: seconds after which a message held by a worker no longer counts (see the module).
        chunk: messages per Lua call while reading a queue.
    """

    def __init__(self, client: redis.Redis, *, held_for_s: float = 1800.0, chunk: int = 1000) -> None:
        self._r = client
        self._held_for_s = held_for_s
        self._chunk = chunk
        self._queued = client.register_script(scripts.QUEUED_JOBS)
        self._unacked = client.register_script(_UNACKED_JOBS)

    def quiet(self, quiet_s: float, *, limit: int = 100_000, page: int = 5000) -> list[tuple[str, bytes]]:
        """Unfinished jobs unchanged for at least `quiet_s` seconds (Redis server time), longest first, read
        in pages of `page` (a backlog of queued jobs is quiet too: a lost job must not hide behind it).

        Returns:
            Up to `limit` ``(job_id, touched score as raw bytes)``.
        """
        seconds, micros = self._r.time()
        ceiling = seconds + micros / 1e6 - quiet_s
        out: list[tuple[str, bytes]] = []
        while len(out) < limit:
            rows: list[Any] = self._r.zrangebyscore(scripts.TOUCHED_KEY, "-inf", ceiling, start=len(out),
                                                    num=min(page, limit - len(out)), withscores=True,
                                                    score_cast_func=bytes)
            out += [(_text(job_id), bytes(score)) for job_id, score in rows]
            if len(rows) < page:
                break
        return out

    def present(self, queues: Iterable[str]) -> set[str]:
        """Ids of the jobs that have a message in one of `queues` or held by a worker (kombu's unacked hash)
        for less than ``held_for_s``.

        Each queue is read from its head (newest) to its current end in slices; a message pushed meanwhile
        only shifts the rest further along, so none is skipped. The held messages are read last: a message
        taken from a queue after that queue was read is held by then (or lost).
        """
        found: set[str] = set()
        for queue in sorted(set(queues)):
            start = 0
            while True:
                ids = self._queued(keys=[queue], args=[start, start + self._chunk - 1])
                found.update(_text(i) for i in ids)
                if self._r.llen(queue) <= start + self._chunk:
                    break
                start += self._chunk
        seconds, micros = self._r.time()
        since = seconds + micros / 1e6 - self._held_for_s
        found.update(_text(i) for i in self._unacked(keys=[UNACKED_KEY, UNACKED_INDEX_KEY], args=[since]))
        return found

    def next_tasks(self, job_id: str) -> tuple[NextTask, ...]:
        """The messages the job's last change queued (its ``next`` field); empty when unknown or unreadable."""
        raw = self._r.hget(f"memq:job:{job_id}", "next")
        if raw is None:
            return ()
        try:
            rows = json.loads(raw)
            return tuple(NextTask(str(row[0]), int(row[1]), str(row[2]), str(row[3]) if len(row) > 3 else "")
                         for row in rows)
        except (TypeError, ValueError, IndexError):
            return ()

    def find(self, *, quiet_s: float, confirm_s: float = 1.0, limit: int = 100_000) -> list[LostJob]:
        """The lost jobs: unchanged for `quiet_s` seconds, with no message in a queue nor held by a worker,
        twice `confirm_s` seconds apart, and unchanged in between.

        Args:
            quiet_s: seconds a job must have been unchanged.
            confirm_s: seconds between the two looks.
            limit: at most this many quiet jobs are looked at (the longest unchanged first).

        Returns:
            The lost jobs (their ``next`` tasks and touched scores, for `JobStore.rescue`).

        Raises:
            redis.exceptions.RedisError: Redis is unreachable.
        """
        quiet = self.quiet(quiet_s, limit=limit)
        if not quiet:
            return []
        scores = dict(quiet)
        queues = set(Queues.ALL) | self._queues_of(list(scores))
        missing = set(scores) - self.present(queues)
        if not missing:
            return []
        time.sleep(confirm_s)
        missing -= self.present(queues)
        lost = []
        for job_id in sorted(missing):
            if self._r.zscore(scripts.TOUCHED_KEY, job_id) is None:
                continue  # finished meanwhile
            lost.append(LostJob(job_id, scores[job_id], self.next_tasks(job_id)))
        return lost

    def _queues_of(self, job_ids: list[str], *, batch: int = 1000) -> set[str]:
        """The queues named in the ``next`` fields of `job_ids` (read in pipelined batches)."""
        found: set[str] = set()
        for start in range(0, len(job_ids), batch):
            pipe = self._r.pipeline(transaction=False)
            for job_id in job_ids[start:start + batch]:
                pipe.hget(f"memq:job:{job_id}", "next")
            for raw in pipe.execute():
                try:
                    found.update(str(row[2]) for row in json.loads(raw or "[]"))
                except (TypeError, ValueError, IndexError):
                    continue
        return found

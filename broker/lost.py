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
  and this is still so when looked at again ``confirm_s`` later (a live worker records a message it
  took within milliseconds). A message held for longer than ``held_for_s`` (twice the visibility
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
from typing import Any

import redis

from broker import scripts
from memq.config import Queues

UNACKED_KEY = "unacked"
"""kombu's hash of the messages workers hold (delivery tag -> ``[message, exchange, routing key]``)."""

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


@dataclass(frozen=True)
class LostJob:
    """A job whose next task message is nowhere.

    Attributes:
        job_id: the job.
        touched: its ``memq:jobs:touched`` score as Redis returned it (`JobStore.rescue` pushes only if it
            is unchanged).
        next: ``(task, retries, queue)`` of the messages its last change queued (empty when unknown).
    """

    job_id: str
    touched: bytes
    next: tuple[tuple[str, int, str], ...]


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

    def quiet(self, quiet_s: float, *, limit: int = 1000) -> list[tuple[str, bytes]]:
        """Unfinished jobs unchanged for at least `quiet_s` seconds (Redis server time), longest first.

        Returns:
            Up to `limit` ``(job_id, touched score as raw bytes)``.
        """
        seconds, micros = self._r.time()
        ceiling = seconds + micros / 1e6 - quiet_s
        rows: list[Any] = self._r.zrangebyscore(scripts.TOUCHED_KEY, "-inf", ceiling, start=0, num=limit,
                                                withscores=True, score_cast_func=bytes)
        return [(_text(job_id), bytes(score)) for job_id, score in rows]

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

    def next_tasks(self, job_id: str) -> tuple[tuple[str, int, str], ...]:
        """``(task, retries, queue)`` of the messages the job's last change queued (``next`` field)."""
        raw = self._r.hget(f"memq:job:{job_id}", "next")
        if raw is None:
            return ()
        try:
            rows = json.loads(raw)
            return tuple((str(task), int(retries), str(queue)) for task, retries, queue in rows)
        except (TypeError, ValueError):
            return ()

    def find(self, *, quiet_s: float, confirm_s: float = 1.0, limit: int = 1000) -> list[LostJob]:
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
        candidates = {job_id: (score, self.next_tasks(job_id)) for job_id, score in quiet}
        queues = set(Queues.ALL) | {q for _, tasks in candidates.values() for _, _, q in tasks}
        missing = set(candidates) - self.present(queues)
        if not missing:
            return []
        time.sleep(confirm_s)
        missing -= self.present(queues)
        lost = []
        for job_id in sorted(missing):
            score, tasks = candidates[job_id]
            if self._r.zscore(scripts.TOUCHED_KEY, job_id) is None:
                continue  # finished meanwhile
            lost.append(LostJob(job_id, score, tasks))
        return lost

"""The caption cache: a vision model's description of an image, shared by every worker through Redis.

Keys are `memq.images.image_key` digests (the model and the image's bytes or URL), so the same image
in a backfill costs one model call however many jobs and workers meet it. A short lease per image
lets only one worker describe an image at a time: another job meeting it meanwhile waits and reads the
cached caption instead of asking the model too.

Only model captions are cached. A caption a caller supplied with the image is that caller's word and
is never shared with other tenants (one tenant must not be able to label another's images).

A job's own notes (`CaptionCache.notes`) keep what its caption stage learned about its images in
earlier runs (a batch the model refused, an image it refused alone, an image it described), so a stage
re-queued in the middle of that work (the rate limiter had no budget) goes on from where it stopped.
They are the job's only: a refusal is never shared with another job.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import redis

from broker.outage import ride_out

__all__ = ["ALONE", "DESCRIBED", "REFUSED", "CaptionCache"]

PREFIX = "memq:caption:"
LEASE_PREFIX = "memq:caption-lease:"
NOTES_PREFIX = "memq:caption-notes:"

ALONE = "alone"
"""Note: the image was in a batch the model refused (a 4xx); ask it in a call of its own."""
REFUSED = "refused"
"""Note: the model refused the image alone; it is dropped without another call."""
DESCRIBED = "described"
"""Note: the model described the image for this job (its caption is in the cache)."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CaptionCache:
    """Model captions by image key, in Redis.

    Every call rides out a Redis restart of up to `outage_s` seconds like the job records do, then
    raises `BrokerUnavailable` (the worker leaves the stage's message for redelivery; the job is not
    failed).

    Args:
        client: a `redis.Redis` client (``decode_responses=False``).
        ttl_s: how long a caption stays cached (seconds).
        outage_s: how long a call keeps retrying while Redis is unreachable (seconds).
    """

    def __init__(self, client: redis.Redis, *, ttl_s: int, outage_s: float = 0.0) -> None:
        self._r = client
        self._ttl_s = ttl_s
        self._outage_s = outage_s
        self._release = client.register_script(_RELEASE)

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The cached captions of `keys` (missing keys left out), in one round trip.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        if not keys:
            return {}
        values: list[bytes | str | None] = ride_out(lambda: self._r.mget([PREFIX + k for k in keys]), self._outage_s)
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in zip(keys, values) if v is not None}

    def put_many(self, captions: dict[str, str]) -> None:
        """Cache `captions` (key -> caption) for `ttl_s` seconds, in one round trip.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        if not captions:
            return
        pipe = self._r.pipeline(transaction=False)
        for key, caption in captions.items():
            pipe.set(PREFIX + key, caption.encode(), ex=self._ttl_s)
        ride_out(pipe.execute, self._outage_s)

    def notes(self, job_id: str) -> dict[str, str]:
        """What earlier runs of the job's caption stage noted about its images: image key -> `ALONE`,
        `REFUSED` or `DESCRIBED` (empty for a first run).

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        raw: dict[bytes | str, bytes | str] = ride_out(lambda: self._r.hgetall(NOTES_PREFIX + job_id), self._outage_s)
        return {_text(k): _text(v) for k, v in raw.items()}

    def note(self, job_id: str, notes: dict[str, str]) -> None:
        """Add `notes` (image key -> `ALONE`, `REFUSED` or `DESCRIBED`) to the job's; they live `ttl_s`
        seconds after the last one.

        Raises:
            BrokerUnavailable: Redis stayed unreachable.
        """
        if not notes:
            return
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(NOTES_PREFIX + job_id, items=[part for pair in notes.items() for part in pair])
        pipe.expire(NOTES_PREFIX + job_id, self._ttl_s)
        ride_out(pipe.execute, self._outage_s)

    def lease(self, keys: Sequence[str], *, ttl_s: float) -> tuple[dict[str, str], list[str]]:
        """Take the right to describe each image of `keys` (one worker at a time per image).

        Args:
            keys: image keys not found in the cache.
            ttl_s: seconds after which a lease lapses by itself (its holder died).

        Returns:
            ``(mine, theirs)``: the leases taken (key -> token, for `release`), and the keys another
            worker is describing right now.
        """
        if not keys:
            return {}, []
        tokens = {k: uuid.uuid4().hex for k in keys}
        pipe = self._r.pipeline(transaction=False)
        for key, token in tokens.items():
            pipe.set(LEASE_PREFIX + key, token, nx=True, px=max(1, int(ttl_s * 1000)))
        taken = ride_out(pipe.execute, self._outage_s)
        mine = {k: t for (k, t), ok in zip(tokens.items(), taken) if ok}
        return mine, [k for k in keys if k not in mine]

    def release(self, leases: dict[str, str]) -> None:
        """Give back leases taken with `lease` (a lease another worker took after ours lapsed is kept)."""
        for key, token in leases.items():
            ride_out(lambda: self._release(keys=[LEASE_PREFIX + key], args=[token]), self._outage_s)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

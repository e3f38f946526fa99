"""One Redis call that rides out a Redis restart: retried while Redis is unreachable, for a bounded
time, then reported as `BrokerUnavailable` (a worker leaves the task's message for redelivery)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
import tenacity

from memq.errors import BrokerUnavailable

__all__ = ["ride_out"]

T = TypeVar("T")


def ride_out(fn: Callable[[], T], outage_s: float) -> T:
    """Run `fn` (Redis calls that are safe to repeat), retrying it while Redis is unreachable.

    Args:
        fn: the call.
        outage_s: how long to keep retrying (seconds); 0 fails at once (the producer does).

    Raises:
        BrokerUnavailable: Redis refused or timed out for longer than `outage_s`.
    """
    try:
        if outage_s <= 0:
            return fn()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
            stop=tenacity.stop_after_delay(outage_s),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0), reraise=True)
        return retrying(fn)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"Redis is unreachable: {type(exc).__name__}") from None

"""One provider budget in the shared rate limiter, as a call to a hosted model spends it.

A call takes its budget first (`ProviderBudget.take`), then reports how it went: a success
(`ProviderBudget.succeeded`: counted in the achieved rate, the token estimate corrected) or a 429
(`ProviderBudget.refused`: with ``Retry-After`` the budget is blocked for every worker until then;
without it the learned rate reacts, `broker.adaptive`). The caller raises `RateLimited` for a 429: a
wait, never a failed attempt. The bookkeeping after a call is best effort: a Redis error there never
loses a reply already paid for, nor turns a 429 into an attempt (it stays a wait of
`broker.adaptive.PAUSE_S`).

Budgets are named per model and use: the extraction model's (its model string), the vision model's
(``vision:<model>``) and a hosted embedder's (``embed:<model>``), so none eats another's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.adaptive import PAUSE_S
from broker.ratelimit import RateLimiter
from memq import metrics
from memq.errors import ProviderThrottled, RateLimited, StoreUnavailable

__all__ = ["ProviderBudget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderBudget:
    """A model's budget in the shared limiter.

    Attributes:
        limiter: the shared rate limiter (Redis); None: calls go at once, learn nothing, and a 429 waits
            its ``Retry-After`` or `broker.adaptive.PAUSE_S`.
        name: the budget's name (``openai/gpt-4o-mini``, ``vision:<model>``, ``embed:<model>``).
        rpm: configured requests per minute (a ceiling for the learned rate); None: none.
        tpm: configured tokens per minute; None: none.
        burst_s: seconds of budget one burst may spend (0 < burst_s <= 60).
    """

    limiter: RateLimiter | None
    name: str
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 60.0

    def take(self, tokens: int = 0) -> None:
        """Take one request and `tokens` (an estimate, >= 0) from the budget, or raise.

        Raises:
            RateLimited: no room yet (the configured or learned rate, a ``Retry-After`` block or the
                learned pause); ``retry_after_s`` says how long to wait.
            StoreUnavailable: Redis refused or timed out (retryable).
        """
        if self.limiter is None:
            return
        wait_s = self.limiter.acquire(self.name, rpm=self.rpm, tpm=self.tpm, tokens=tokens, burst_s=self.burst_s)
        if wait_s > 0:
            metrics.LIMITER_WAITS.labels(self.name).inc()
            metrics.LIMITER_WAIT_SECONDS.labels(self.name).inc(wait_s)
            raise RateLimited(f"no budget for {self.name} yet", retry_after_s=wait_s)

    def succeeded(self, sent_s_ago: float, *, estimated: int = 0, actual: int = 0) -> None:
        """Report a successful call sent `sent_s_ago` seconds ago (best effort: a Redis error is logged).

        Args:
            sent_s_ago: seconds since the call was sent (>= 0).
            estimated: the tokens passed to `take`.
            actual: the tokens the provider reported (0: unknown, nothing corrected).
        """
        if self.limiter is None:
            return
        try:
            show_learned(self.name, self.limiter.succeeded(self.name, sent_s_ago=max(0.0, sent_s_ago), rpm=self.rpm))
            if actual:
                self.limiter.record_actual(self.name, tpm=self.tpm, estimated=estimated, actual=actual,
                                           burst_s=self.burst_s)
        except StoreUnavailable as exc:
            logger.warning("%s: the rate limiter missed a success (%s); the reply is kept", self.name, exc)

    def refused(self, exc: ProviderThrottled, sent_s_ago: float) -> float:
        """Tell every worker about a 429 and return the seconds to wait: the provider's ``Retry-After``
        (the budget is blocked until then), else the pause the learned rate's reaction set.

        Args:
            exc: the provider's 429.
            sent_s_ago: seconds since the refused call was sent (>= 0).

        Returns:
            Seconds to wait (> 0). Never raises: a Redis error leaves a wait of `broker.adaptive.PAUSE_S`.
        """
        if exc.retry_after_s:
            if self.limiter is not None:
                try:
                    self.limiter.block(self.name, exc.retry_after_s)
                except StoreUnavailable as error:
                    logger.warning("%s answered 429; the rate limiter could not block it (%s)", self.name, error)
            return exc.retry_after_s
        if self.limiter is None:
            return PAUSE_S
        try:
            throttle = self.limiter.throttled(self.name, sent_s_ago=max(0.0, sent_s_ago), rpm=self.rpm)
        except StoreUnavailable as error:  # the 429 stays a wait, never an attempt, even when Redis blinks
            logger.warning("%s answered 429; the rate limiter could not learn from it (%s)", self.name, error)
            return PAUSE_S
        show_learned(self.name, throttle.learned_rpm)
        if throttle.reacted:
            logger.warning("%s answered 429 without Retry-After: learned rate %s, every worker pauses %.1f s",
                           self.name, "none" if throttle.learned_rpm is None else f"{throttle.learned_rpm:.1f}/min",
                           throttle.pause_s)
        return throttle.pause_s or PAUSE_S


def show_learned(budget: str, rpm: float | None) -> None:
    """Keep this process's ``memq_llm_learned_rpm`` gauge in step with the shared learned rate.

    The gauge moves only when this process calls the model: another worker's change, or the rate
    forgotten an hour after the last call, shows here at this process's next call of that model.
    """
    if rpm is not None:
        metrics.LLM_LEARNED_RPM.labels(budget).set(rpm)
        return
    try:
        metrics.LLM_LEARNED_RPM.remove(budget)
    except KeyError:
        pass

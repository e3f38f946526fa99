"""The litellm seam shared by the embedder and the model stages: import set-up and error translation.

litellm tries to download a price map when imported unless ``LITELLM_LOCAL_MODEL_COST_MAP`` is set;
`import_litellm` sets it first. `mapped_provider_errors` turns litellm/OpenAI errors into memq's:
429 becomes `ProviderThrottled`, 408, 409, 5xx, timeouts and refused connections `LLMUnavailable` (both
with ``Retry-After`` in seconds when the provider sent one, as seconds or as an HTTP-date); a 429 whose
error code says the account's quota is used up (OpenAI's ``insufficient_quota``: billing, not a rate)
is a permanent `ProviderQuotaExhausted`; any other 4xx (bad request, auth) is a permanent `InvalidJob`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from types import ModuleType

from memq.errors import InvalidJob, LLMUnavailable, ProviderQuotaExhausted, ProviderThrottled

_TRANSIENT_STATUS = {408, 409, 429}
QUOTA_CODES = frozenset({"insufficient_quota"})
"""Error codes of a 429 that mean the account's quota is used up, not a rate (OpenAI's; litellm keeps the
provider's error object as the exception's ``body``)."""


def import_litellm() -> ModuleType:
    """Import litellm with its network price-map download off, its logging quiet and no retries of its own."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm

    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    # memq makes one attempt per call (its limiter must see every 429): litellm's OpenAI embedding reads
    # `max_retries or DEFAULT_MAX_RETRIES`, so the max_retries=0 memq passes became 2 hidden retries
    litellm.DEFAULT_MAX_RETRIES = 0  # type: ignore[attr-defined]
    return litellm


def _retry_after_s(exc: BaseException) -> float | None:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    return retry_after_s(value) if value is not None else None


def retry_after_s(value: str, *, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from now (RFC 9110: delay-seconds or an HTTP-date).

    Returns:
        Seconds (>= 0; a date already past is 0), or None when the value is neither (or not finite).
    """
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _quota_code(exc: BaseException) -> str | None:
    """The provider's error code or type (of the exception's body) when it is one of `QUOTA_CODES`."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict):
        return None
    return next((v for v in (body.get("code"), body.get("type")) if isinstance(v, str) and v in QUOTA_CODES), None)


def _refused_429(what: str, exc: BaseException) -> ProviderThrottled | ProviderQuotaExhausted:
    """What a 429 is: a quota used up (`QUOTA_CODES`), else a rate limit."""
    code = _quota_code(exc)
    if code is not None:
        return ProviderQuotaExhausted(f"{what}: the provider's quota is used up (429 {code}): billing, not a rate "
                                      "limit; add credit, then `memq dlq replay`", code=code)
    return ProviderThrottled(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc))


@contextmanager
def mapped_provider_errors(what: str) -> Iterator[None]:
    """Translate provider errors raised inside the block.

    Args:
        what: a short label for messages (``"completion openai/gpt-4o-mini"``).

    Raises:
        ProviderThrottled: 429 (with `retry_after_s` when the provider sent ``Retry-After``).
        ProviderQuotaExhausted: 429 with the error code ``insufficient_quota`` (never retried).
        LLMUnavailable: 408/409, 5xx, timeout, connection refused.
        InvalidJob: another 4xx (bad request, auth, not found): retrying would not help.
    """
    litellm = import_litellm()
    import openai

    try:
        yield
    except litellm.RateLimitError as exc:
        raise _refused_429(what, exc) from exc
    except (litellm.Timeout, litellm.APIConnectionError,
            litellm.InternalServerError, litellm.ServiceUnavailableError) as exc:
        raise LLMUnavailable(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc)) from exc
    except litellm.APIError as exc:
        status = getattr(exc, "status_code", None)
        if status == 429:
            raise _refused_429(what, exc) from exc
        if status is None or status >= 500 or status in _TRANSIENT_STATUS:
            raise LLMUnavailable(f"{what}: {type(exc).__name__} {status}", retry_after_s=_retry_after_s(exc)) from exc
        raise InvalidJob(f"{what}: provider refused the request ({status} {type(exc).__name__})") from exc
    except openai.OpenAIError as exc:  # 4xx classes: BadRequest, Authentication, NotFound ...
        status = getattr(exc, "status_code", None)
        if status == 429:
            raise _refused_429(what, exc) from exc
        if status in _TRANSIENT_STATUS:
            raise LLMUnavailable(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc)) from exc
        raise InvalidJob(f"{what}: provider refused the request ({status} {type(exc).__name__})") from exc

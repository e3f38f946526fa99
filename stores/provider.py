"""The litellm seam shared by the embedder and the model stages: import set-up and error translation.

litellm tries to download a price map when imported unless ``LITELLM_LOCAL_MODEL_COST_MAP`` is set;
`import_litellm` sets it first. `mapped_provider_errors` turns litellm/OpenAI errors into memq's:
429 becomes `ProviderThrottled`, 408, 409, 5xx, timeouts and refused connections `LLMUnavailable` (both
with ``Retry-After`` in seconds when the provider sent one); any other 4xx (bad request, auth) is a
permanent `InvalidJob`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from memq.errors import InvalidJob, LLMUnavailable, ProviderThrottled

_TRANSIENT_STATUS = {408, 409, 429}


def import_litellm() -> ModuleType:
    """Import litellm with its network price-map download off and its logging quiet."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm

    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def _retry_after_s(exc: BaseException) -> float | None:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@contextmanager
def mapped_provider_errors(what: str) -> Iterator[None]:
    """Translate provider errors raised inside the block.

    Args:
        what: a short label for messages (``"completion openai/gpt-4o-mini"``).

    Raises:
        ProviderThrottled: 429 (with `retry_after_s` when the provider sent ``Retry-After``).
        LLMUnavailable: 408/409, 5xx, timeout, connection refused.
        InvalidJob: another 4xx (bad request, auth, not found): retrying would not help.
    """
    litellm = import_litellm()
    import openai

    try:
        yield
    except litellm.RateLimitError as exc:
        raise ProviderThrottled(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc)) from exc
    except (litellm.Timeout, litellm.APIConnectionError,
            litellm.InternalServerError, litellm.ServiceUnavailableError) as exc:
        raise LLMUnavailable(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc)) from exc
    except litellm.APIError as exc:
        status = getattr(exc, "status_code", None)
        if status is None or status >= 500 or status in _TRANSIENT_STATUS:
            error = ProviderThrottled if status == 429 else LLMUnavailable
            raise error(f"{what}: {type(exc).__name__} {status}", retry_after_s=_retry_after_s(exc)) from exc
        raise InvalidJob(f"{what}: provider refused the request ({status} {type(exc).__name__})") from exc
    except openai.OpenAIError as exc:  # 4xx classes: BadRequest, Authentication, NotFound ...
        status = getattr(exc, "status_code", None)
        if status in _TRANSIENT_STATUS:
            error = ProviderThrottled if status == 429 else LLMUnavailable
            raise error(f"{what}: {type(exc).__name__}", retry_after_s=_retry_after_s(exc)) from exc
        raise InvalidJob(f"{what}: provider refused the request ({status} {type(exc).__name__})") from exc

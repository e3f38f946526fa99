"""The one seam to language models: litellm with JSON replies parsed into pydantic models.

Every call makes one attempt (``max_retries=0``): memq's own retries decide what happens next. A reply
that does not fit the response model gets one repair (the ``json-repair`` library) and then raises
`LLMOutputError`; it is never read as "no facts".

Every call of a provider's model goes through the shared rate limiter (`broker.ratelimit`), with or
without a configured ``rpm``/``tpm`` (`broker.budget`): a provider's 429 is a wait (`RateLimited`),
never a failed attempt. With ``Retry-After`` the model is blocked for every worker until then; without
it the limiter learns the provider's rate (`broker.adaptive`: lowered on each 429, raised slowly by
each success, which every call reports).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from pydantic import BaseModel, ValidationError

from memq.config import OFFLINE_MODEL, LLMSettings
from memq import metrics
from memq.errors import LLMOutputError, LLMUnavailable, ProviderThrottled, RateLimited
from broker.budget import ProviderBudget
from broker.ratelimit import RateLimiter
from pipeline import offline_model
from pipeline.types import LLMUsage
from stores.embedder import Embedder
from stores.provider import import_litellm, mapped_provider_errors

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

OFFLINE_PROVIDER = OFFLINE_MODEL.split("/", 1)[0]
_registered = threading.Lock()


def _register_offline_provider(embedder: Embedder | None) -> None:
    litellm = import_litellm()
    with _registered:
        if embedder is not None:
            offline_model.use_embedder(embedder)
        providers: list[dict[str, object]] = getattr(litellm, "custom_provider_map", [])
        if any(p.get("provider") == OFFLINE_PROVIDER for p in providers):
            return
        litellm.custom_provider_map = [*providers, {  # type: ignore[attr-defined]
            "provider": OFFLINE_PROVIDER, "custom_handler": offline_model.OfflineHeuristicModel()}]


def parse_reply(text: str, model: type[M]) -> M:
    """Parse a model reply into `model`, repairing broken JSON once.

    Raises:
        LLMOutputError: the reply does not fit `model` even after repair.
    """
    try:
        return model.model_validate_json(text)
    except ValidationError:
        pass
    import json_repair

    repaired = json_repair.repair_json(text, return_objects=False, skip_json_loads=False)
    try:
        return model.model_validate_json(repaired if isinstance(repaired, str) else "")
    except ValidationError as exc:
        # `from None`: pydantic's error quotes the reply, which may quote the prompt (user data)
        raise LLMOutputError(f"reply does not fit {model.__name__}: {exc.error_count()} errors", reply=text) from None


IMAGE_TOKENS_ESTIMATE = 765
"""Tokens one image is assumed to cost before the provider says (OpenAI's count for a 1024 px image at
``detail=high``; ``low`` is 85): used only for the shared limiter's estimate."""


@dataclass(frozen=True)
class ImageInput:
    """An image sent with the user prompt.

    Attributes:
        label: text placed just before the image (``"Image 2:"``), so the reply can refer to it.
        url: an http(s) URL or a ``data:`` URL.
        detail: OpenAI's ``low``/``high``/``auto``, or None for the provider's default.
    """

    label: str
    url: str
    detail: str | None = None


class LLM:
    """A JSON-mode chat model behind litellm.

    Args:
        settings: model string (any litellm model, or the offline default), API base/key, timeout (s),
            and the model's shared budget (``rpm``, ``tpm``).
        embedder: the embedder the offline model's decider uses (the worker's); None loads the default.
        limiter: the shared rate limiter (Redis); None calls without a budget and learns nothing from
            429s. The offline model never uses it (it has no provider to throttle it).
        budget: the limiter's name for this model's budget (default: the model string); the vision
            model uses ``vision:<model>`` so captioning never eats the extraction budget.
    """

    def __init__(self, settings: LLMSettings, *, embedder: Embedder | None = None,
                 limiter: RateLimiter | None = None, budget: str | None = None) -> None:
        self.settings = settings
        self.budget = budget or settings.model
        offline = settings.model.startswith(OFFLINE_PROVIDER + "/")
        self._budget = ProviderBudget(None if offline else limiter, self.budget, rpm=settings.rpm, tpm=settings.tpm,
                                      burst_s=settings.burst_s)
        self._litellm = import_litellm()
        if offline:
            _register_offline_provider(embedder)

    def complete_json(self, system: str, user: str, response_model: type[M], *,
                      images: Sequence[ImageInput] = ()) -> tuple[M, LLMUsage]:
        """One chat completion in JSON mode, parsed into `response_model`.

        Args:
            system: system prompt.
            user: user prompt.
            response_model: the pydantic model the reply must fit.
            images: images sent after the user prompt, each after its label (a vision model's call).

        Returns:
            The parsed reply and the call's usage (1 call, tokens as reported).

        Raises:
            RateLimited: the model's shared budget (``rpm``/``tpm``, or the rate learned from 429s) has no
                room yet, or the provider answered 429 (its cause is then the `ProviderThrottled`); wait
                ``retry_after_s`` (the provider's ``Retry-After``, or the learned pause).
            LLMUnavailable: timed out, refused, 5xx (retryable).
            InvalidJob: the provider refused the request (4xx other than 408/409/429).
            LLMOutputError: the reply does not fit `response_model` after one repair.
            ProviderQuotaExhausted: the provider answered 429 `insufficient_quota` (billing; never retried).
        """
        s = self.settings
        estimate = ((len(system) + len(user) + sum(len(i.label) for i in images)) // 4
                    + IMAGE_TOKENS_ESTIMATE * len(images) + min(s.max_tokens, 512))
        self._budget.take(estimate)
        content: str | list[dict[str, Any]] = user
        if images:
            content = [{"type": "text", "text": user}]
            for image in images:
                url: dict[str, str] = {"url": image.url, **({"detail": image.detail} if image.detail else {})}
                content += [{"type": "text", "text": image.label}, {"type": "image_url", "image_url": url}]
        sent = time.monotonic()
        try:
            response = self._call(system, content)
        except ProviderThrottled as exc:
            metrics.LLM_CALLS.labels(s.model, "rate_limited").inc()
            raise RateLimited(f"{self.budget}: the provider answered 429",
                              retry_after_s=self._budget.refused(exc, time.monotonic() - sent)) from exc
        except LLMUnavailable:
            metrics.LLM_CALLS.labels(s.model, "error").inc()
            raise
        except Exception:
            metrics.LLM_CALLS.labels(s.model, "error").inc()
            raise
        text = response.choices[0].message.content or ""
        usage = getattr(response, "usage", None)
        spent = LLMUsage(calls=1, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                         completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
        metrics.LLM_CALLS.labels(s.model, "ok").inc()
        metrics.LLM_TOKENS.labels(s.model, "prompt").inc(spent.prompt_tokens)
        metrics.LLM_TOKENS.labels(s.model, "completion").inc(spent.completion_tokens)
        self._budget.succeeded(time.monotonic() - sent, estimated=estimate,
                               actual=spent.prompt_tokens + spent.completion_tokens if spent.prompt_tokens else 0)
        logger.debug("model reply (%s): %s", response_model.__name__, text)
        return parse_reply(text, response_model), spent

    def _call(self, system: str, user: str | list[dict[str, Any]]) -> Any:
        """One completion attempt; short in-call retries (tenacity) for dropped connections only."""
        s = self.settings
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_connection_dropped), stop=tenacity.stop_after_attempt(3),
            wait=tenacity.wait_exponential(multiplier=0.2, max=2), reraise=True)
        for attempt in retrying:
            with attempt, mapped_provider_errors(f"completion {s.model}"):
                return self._litellm.completion(
                    model=s.model,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                    response_format={"type": "json_object"},
                    temperature=s.temperature,
                    max_tokens=s.max_tokens,
                    timeout=s.timeout_s,
                    api_base=s.api_base,
                    api_key=s.api_key.get_secret_value() if s.api_key else None,
                    max_retries=0,
                    drop_params=True,
                )
        raise AssertionError("unreachable: tenacity reraises")


def _connection_dropped(exc: BaseException) -> bool:
    """A refused or dropped connection (not a 429, 5xx or timeout: those go to the task's retries)."""
    cause = exc.__cause__
    return isinstance(exc, LLMUnavailable) and type(cause).__name__ == "APIConnectionError"

"""The optional rerank step of a search: reorder the vector hits by a rerank model's relevance.

Mem0 reranks the hits it already has (``Memory.search(rerank=True)`` with a configured reranker) and
adds each hit's ``rerank_score``; memq does the same, but first widens the candidates to
``rerank.candidates`` hits so the reranker can lift a memory the vector order had put below the limit.

Models: any litellm rerank model (`litellm.rerank`, Cohere's request shape), or
``cross-encoder:<name or folder>`` for a local sentence-transformers cross-encoder (loaded once per
process; needs the ``local`` extra). Errors are mapped to memq's: a rerank that fails fails the
search (the caller asked for reranked results; a silent fallback would hide a broken provider).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from memq.config import RerankSettings
from memq.errors import LLMOutputError, LLMUnavailable

LOCAL_PREFIX = "cross-encoder:"
"""`RerankSettings.model` prefix of a local cross-encoder."""

_local_lock = threading.Lock()


def rerank(settings: RerankSettings, query: str, documents: Sequence[str]) -> list[tuple[int, float]]:
    """Relevance of each document to the query, best first.

    Args:
        settings: the rerank model (``settings.model`` must be set) and its endpoint.
        query: the search query.
        documents: the candidate memories' texts.

    Returns:
        ``(index into documents, relevance score)`` for every document, best first (scores as the model
        gives them: Cohere-style models in 0..1, cross-encoders as logits).

    Raises:
        ValueError: no rerank model is configured.
        LLMUnavailable: the provider refused, timed out or is unreachable, or the local model is not
            installed.
        LLMOutputError: the reply does not score every document exactly once.
    """
    if settings.model is None:
        raise ValueError("no rerank model is configured (MEMQ_RERANK__MODEL)")
    if not documents:
        return []
    if settings.model.startswith(LOCAL_PREFIX):
        scores = _cross_encoder(settings.model[len(LOCAL_PREFIX):]).predict([(query, d) for d in documents])
        ranked = [(i, float(s)) for i, s in enumerate(scores)]
    else:
        ranked = _litellm(settings, query, documents)
    if sorted(i for i, _ in ranked) != list(range(len(documents))):
        raise LLMOutputError(f"the rerank model scored {len(ranked)} of {len(documents)} documents")
    return sorted(ranked, key=lambda r: -r[1])


def _litellm(settings: RerankSettings, query: str, documents: Sequence[str]) -> list[tuple[int, float]]:
    import litellm

    kwargs: dict[str, Any] = {"timeout": settings.timeout_s}
    if settings.api_base:
        kwargs["api_base"] = settings.api_base
    if settings.api_key is not None:
        kwargs["api_key"] = settings.api_key.get_secret_value()
    try:
        reply = litellm.rerank(model=settings.model, query=query, documents=list(documents),
                               top_n=len(documents), **kwargs)
    except Exception as exc:  # noqa: BLE001  (every provider error: litellm maps them to many classes)
        raise LLMUnavailable(f"rerank {settings.model}: {type(exc).__name__}") from exc
    try:
        return [(int(r["index"]), float(r["relevance_score"])) for r in reply.results or []]
    except (KeyError, TypeError, ValueError) as exc:
        raise LLMOutputError(f"rerank {settings.model}: a result without index and relevance_score") from exc


@lru_cache(maxsize=2)
def _cross_encoder(name: str) -> Any:
    with _local_lock:
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:
            raise LLMUnavailable("a cross-encoder needs sentence-transformers (pip install 'memq[local]')") from exc
        try:
            return CrossEncoder(name)
        except Exception as exc:  # noqa: BLE001  (a missing model folder, no network for a hub name)
            raise LLMUnavailable(f"cross-encoder {name[:80]!r} could not be loaded: {type(exc).__name__}") from exc
